"""Stop strings, applied to the generated text as it streams.

The text of a stop string is not sent, nor anything after it. A stop string can span
chunks, so the matcher holds back the longest tail of the text that could still become one
(e.g. with stop ``"\\n\\nUser:"``, a chunk ending in ``"\\n\\n"`` waits for the next).
Invariant: emitted text never ends with a proper prefix of a stop string, so an occurrence
always starts inside the held-back buffer and one search of the buffer finds it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(stops)
        self._buffer = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add generated text; returns what may be sent now. Sets ``stopped`` on a match."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._buffer += text
        cut = min((i for i in (self._buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._buffer = self._buffer[:cut], ""
            return out
        hold = self._partial_tail()
        out = self._buffer[: len(self._buffer) - hold]
        self._buffer = self._buffer[len(self._buffer) - hold :]
        return out

    def flush(self) -> str:
        """Held-back text, at a natural end of the stream (no stop string followed)."""
        out, self._buffer = ("" if self.stopped else self._buffer), ""
        return out

    def _partial_tail(self) -> int:
        """Length of the longest buffer suffix that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._buffer)), longest, -1):
                if self._buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest
