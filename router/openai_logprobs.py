"""Log-probs in OpenAI's response shapes, from :class:`~router.api.Chunk` fields.

Chat completions (``logprobs: true``, ``top_logprobs: k``)::

    "logprobs": {"content": [{"token", "logprob", "bytes", "top_logprobs": [{...}]}],
                 "refusal": null}

Completions (``logprobs: k``, the legacy shape)::

    "logprobs": {"tokens": [...], "token_logprobs": [...],
                 "top_logprobs": [{token: logprob, ...}, ...], "text_offset": [...]}

A token's text is its id decoded alone (a byte-level token that is part of a multi-byte
character reads as U+FFFD, as in vLLM). Log-probs are the raw model's (before temperature).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from common.logprobs import TokenLogprob


@dataclass(slots=True)
class LogprobsAccumulator:
    """One choice's log-probs, gathered chunk by chunk (text offsets run on across chunks)."""

    chat: bool
    entries: list[TokenLogprob] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)
    offset: int = 0  # characters of completion text before the next token (completions)

    def add(self, logprobs: Sequence[TokenLogprob] | None, texts: dict[int, str] | None) -> None:
        self.entries.extend(logprobs or ())
        self.texts.update(texts or {})

    def json(self, logprobs: Sequence[TokenLogprob], texts: dict[int, str]) -> dict[str, Any]:
        """The ``logprobs`` object of ``logprobs`` (one chunk's, or the whole choice's)."""
        if self.chat:
            return chat_logprobs(logprobs, texts)
        body, self.offset = completion_logprobs(logprobs, texts, self.offset)
        return body

    def whole(self) -> dict[str, Any]:
        self.offset = 0
        return self.json(self.entries, self.texts)


def _text(texts: dict[int, str], token_id: int) -> str:
    return texts.get(token_id, "")


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(logprobs: Sequence[TokenLogprob], texts: dict[int, str]) -> dict[str, Any]:
    content = [
        {
            **_entry(_text(texts, lp.token_id), lp.logprob),
            "top_logprobs": [_entry(_text(texts, t), v) for t, v in lp.top],
        }
        for lp in logprobs
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    logprobs: Sequence[TokenLogprob], texts: dict[int, str], offset: int = 0
) -> tuple[dict[str, Any], int]:
    """The legacy object, and the text offset after its last token."""
    tokens, offsets = [], []
    for lp in logprobs:
        text = _text(texts, lp.token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    body = {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{_text(texts, t): v for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }
    return body, offset
