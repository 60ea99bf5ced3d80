"""Why a transfer failed: one exception class per cause, all under :class:`TransferError`.

A failed transfer keeps its cause in ``transfer.error``; ``kind`` is the short label the
metrics count failures by (and the workers export to Prometheus). ``by_peer`` says whether
the other side decided (its abort, its timeout, its refusal) rather than this process.
"""

from __future__ import annotations

from typing import ClassVar


class TransferError(Exception):
    """Base of every transfer failure."""

    kind: ClassVar[str] = "error"

    def __init__(self, message: str, *, by_peer: bool = False) -> None:
        super().__init__(message)
        self.by_peer = by_peer


class TransferAborted(TransferError):
    """``abort()`` was called here or on the peer, or either endpoint closed."""

    kind = "aborted"


class TransferTimeout(TransferError):
    """The transfer's deadline passed, here or on the peer."""

    kind = "timeout"


class PeerLost(TransferError):
    """The connection broke: the peer crashed, restarted, or is unreachable."""

    kind = "peer_lost"


class IncompatiblePeer(TransferError):
    """The handshake found different model, dtype or KV geometry on the two sides."""

    kind = "incompatible"


class TransferRejected(TransferError):
    """The receiver refused this transfer (unknown id, already finished, count mismatch)."""

    kind = "rejected"


class ProtocolError(TransferError):
    """A frame arrived that does not belong here: stale, misordered or corrupt."""

    kind = "protocol"


FAILURE_KINDS: tuple[str, ...] = tuple(
    cls.kind
    for cls in (
        TransferAborted,
        TransferTimeout,
        PeerLost,
        IncompatiblePeer,
        TransferRejected,
        ProtocolError,
        TransferError,
    )
)
