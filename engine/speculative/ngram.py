"""Prompt-lookup (n-gram) drafting: find the latest earlier occurrence of the sequence's
last ``n`` tokens (``n`` from ``max_n`` down to ``min_n``) and propose the tokens that
followed it. Deterministic and model-free, so its proposal distribution is one-hot."""

from __future__ import annotations


def propose_ngram(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``k`` tokens continuing ``tokens``; [] when no n-gram of the tail repeats."""
    if k < 1 or len(tokens) < min_n + 1:
        return []
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        start = _latest_match(tokens, n)
        if start is not None:
            follow = start + n
            return tokens[follow : follow + k]
    return []


def _latest_match(tokens: list[int], n: int) -> int | None:
    """Start of the latest earlier occurrence of ``tokens[-n:]`` (not the tail itself)."""
    tail = tokens[-n:]
    first = tail[0]
    end = len(tokens) - n  # the tail's own start; an occurrence must begin before it
    i = end - 1
    while i >= 0:
        try:
            # Scan backwards for the first token of the tail, then compare the rest.
            i = _rindex(tokens, first, i)
        except ValueError:
            return None
        if tokens[i : i + n] == tail:
            return i
        i -= 1
    return None


def _rindex(tokens: list[int], value: int, last: int) -> int:
    """Largest index <= ``last`` holding ``value``; ValueError if none."""
    for i in range(last, -1, -1):
        if tokens[i] == value:
            return i
    raise ValueError(value)
