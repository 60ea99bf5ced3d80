"""Something that runs between ``start()`` and ``stop()``, usable as a ``with`` block."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Service:
    """start() / stop() plus the ``with`` protocol: stop() runs however the block ends."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
