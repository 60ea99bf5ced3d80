"""The two roles of a KV transfer, as the workers see them.

How the two sides meet (every transport follows it):

1. The decode worker reserves destination blocks and calls ``receiver.expect(RecvSpec,
   release)``; the receiver now waits for that transfer id until its deadline.
2. It tells the prefill worker (gRPC, later) the receiver's ``address``, the transfer id
   and the block count.
3. The prefill worker calls ``sender.send(SendSpec, release)``. The sender connects to
   the receiver on first use (handshake: the caches' :class:`~common.kv_compat.KVCompat`
   — model, dtype, KV geometry, cache order — and the backend must match), then
   transfers run in submission order per (sender, receiver) pair.

Both calls return a :class:`~kv_transfer.transfer.Transfer` (state / wait / abort /
error); ``release`` is called exactly once when it is terminal — see that module for the
block contract. Endpoints are thread-safe and serve many pairs at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from kv_transfer.metrics import TransferStats
from kv_transfer.transfer import RecvTransfer, ReleaseFn, SendTransfer
from kv_transfer.types import Handshake, PeerAddress, RecvSpec, SendSpec


class KVSender(ABC):
    """Prefill side: ships blocks of its local KV cache to receivers."""

    handshake: Handshake
    stats: TransferStats

    @abstractmethod
    def send(self, spec: SendSpec, release: ReleaseFn) -> SendTransfer:
        """Queue a transfer to ``spec.peer``; never blocks on the network."""

    @abstractmethod
    def close(self) -> None:
        """Fail every unfinished transfer (releasing its blocks) and drop all pairs."""

    def peers(self) -> tuple[str, ...]:
        """Receiver addresses (``host:port``) this sender holds a pair group with: the
        worker reports them so the router can prefer pairs that need no new group."""
        return ()


class KVReceiver(ABC):
    """Decode side: lands blocks that senders ship into blocks it reserved."""

    handshake: Handshake
    stats: TransferStats

    @property
    @abstractmethod
    def address(self) -> PeerAddress:
        """What senders connect to."""

    @abstractmethod
    def expect(self, spec: RecvSpec, release: ReleaseFn) -> RecvTransfer:
        """Register an incoming transfer; it fails by itself at its deadline."""

    @abstractmethod
    def close(self) -> None:
        """Refuse new senders and fail every unfinished transfer (releasing its blocks)."""
