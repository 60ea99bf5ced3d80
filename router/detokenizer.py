"""Incremental detokenization: token ids in, valid text deltas out.

Decoding each token on its own breaks multi-byte characters (a byte-level BPE token can
hold half of a UTF-8 sequence) and loses context-dependent spacing (SentencePiece drops the
leading space of the first piece it decodes). So, as in vLLM, the detokenizer decodes a
short window of recent tokens twice — up to the last emitted position, and to the end —
and emits the difference, only once it does not end in U+FFFD (an incomplete character,
held back until the next token completes it). :meth:`flush` emits whatever is left when
the request ends. The concatenation of all deltas equals ``decode(all tokens)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"

Decode = Callable[[Sequence[int]], str]


class IncrementalDetokenizer:
    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._prefix_offset = 0  # start of the decoding window
        self._read_offset = 0  # tokens before this are already emitted as text

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; returns the new stable text (possibly empty)."""
        self._tokens.extend(token_ids)
        prefix_text, full_text = self._window()
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """The text still held back (e.g. a trailing incomplete character) at the end."""
        prefix_text, full_text = self._window()
        self._prefix_offset = self._read_offset = len(self._tokens)
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""

    def _window(self) -> tuple[str, str]:
        window = self._tokens[self._prefix_offset :]
        prefix_len = self._read_offset - self._prefix_offset
        return self._decode(window[:prefix_len]), self._decode(window)
