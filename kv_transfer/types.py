"""Plain values that cross the kv_transfer boundary: states, specs, handshake, config.

Everything here is torch-free and immutable, so the workers can build specs from their
gRPC messages and the router can reason about addresses without importing the transport.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from common.kv_compat import KVCompat, differences

# 2: run exchange and direct pieces; 3: pieces posted ahead; 4: whole-pages pieces
PROTOCOL_VERSION = 4


class TransferState(Enum):
    """PENDING → TRANSFERRING → DONE | FAILED; the last two are terminal."""

    PENDING = "pending"  # registered / queued; no byte of it is on the wire yet
    TRANSFERRING = "transferring"  # both sides agreed; frames are moving
    DONE = "done"  # sender: the receiver confirmed landing; receiver: all blocks landed
    FAILED = "failed"  # see ``Transfer.error`` for the cause

    @property
    def terminal(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


class TransferMode(Enum):
    WHOLE = "whole"  # all layers are computed when ``send`` is called
    LAYERWISE = "layerwise"  # the sender marks each layer ready as the prefill computes it


class Role(Enum):
    SENDER = "sender"  # prefill side
    RECEIVER = "receiver"  # decode side


@dataclass(frozen=True, slots=True)
class Handshake(KVCompat):
    """What two peers must agree on before any block moves between them: the caches' KV
    compatibility (:class:`~common.kv_compat.KVCompat`, the same check the registry's
    ``BlockGeometry`` makes) plus the transport's backend and protocol version.

    On the wire (the join's hello and reply) it is a flat JSON object of its fields."""

    backend: str = field(default="gloo", kw_only=True)  # gloo (CPU tensors) or nccl (CUDA)
    protocol: int = field(default=PROTOCOL_VERSION, kw_only=True)

    def mismatch(self, other: Handshake, mine: str = "we", theirs: str = "peer") -> str | None:
        """None when compatible; else every differing field (KV ones first), e.g.
        ``"order: receiver 'layer_first', sender 'page_first'"``, ``"; "``-joined."""
        names = [f.name for f in fields(Handshake)]
        return "; ".join(differences(self, other, names, mine, theirs)) or None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Handshake:
        """Raises TypeError on fields this version does not know or misses (another
        protocol's handshake); fields absent from older peers take their defaults."""
        return cls(**data)


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """Where a receiver listens for senders: host and port of its rendezvous store."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {text!r}")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _check_blocks(block_ids: tuple[int, ...]) -> None:
    if not block_ids:
        raise ValueError("a transfer needs at least one block")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError("block ids of one transfer must be distinct")
    if min(block_ids) < 0:
        raise ValueError("block ids must be >= 0")


@dataclass(frozen=True, slots=True)
class SendSpec:
    """Prefill side: ship ``block_ids`` of the local cache to ``peer`` as ``transfer_id``.

    The i-th source block lands in the i-th destination block the receiver registered.
    """

    transfer_id: str
    peer: PeerAddress
    block_ids: tuple[int, ...]
    mode: TransferMode = TransferMode.WHOLE
    timeout_s: float | None = None  # None: the endpoint's TransferConfig.timeout_s

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_ids", tuple(int(b) for b in self.block_ids))
        _check_blocks(self.block_ids)
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True, slots=True)
class RecvSpec:
    """Decode side: land ``transfer_id`` into the reserved ``block_ids`` (in order)."""

    transfer_id: str
    block_ids: tuple[int, ...]
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_ids", tuple(int(b) for b in self.block_ids))
        _check_blocks(self.block_ids)
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """Knobs of one transport endpoint (sender or receiver)."""

    host: str = "127.0.0.1"  # local address: receiver's store and both sides' gloo device
    port: int = 0  # receiver store port; 0 picks a free one
    # Payload per frame. Frames pipeline pack / send / land, but each one costs a few
    # hundred microseconds of Python and gloo bookkeeping per side: on a CPU-bound box
    # (measured on the 2-core dev VM) 16 MiB frames beat 4 MiB ones; the plan's small
    # first and last frames keep the pipeline's fill and drain short anyway.
    chunk_bytes: int = 16 << 20
    # K (or V) of a run of blocks that is contiguous on both sides moves straight from the
    # sender's cache into the receiver's (no gather, staging or scatter) when that piece
    # is at least this big; smaller pieces are staged, because each message costs a fixed
    # overhead. On the 2-core dev VM (interleaved A/B runs, default model) direct pieces
    # of >= ~200 KiB clearly beat staging, 128-200 KiB ones about break even, and the
    # threshold of 128 KiB did best on block-manager ids (`python -m benchmarks.kv_transfer
    # --direct-kib`).
    direct_min_bytes: int = 128 << 10
    # Frames in flight per pair: the receiver keeps this many receives posted (posting
    # while gloo's IO thread streams into the pair stalls on the pair's lock, so posting
    # ahead keeps the wire busy), the sender this many sends. Staging costs up to
    # depth * chunk_bytes per pair on each side.
    pipeline_depth: int = 3
    max_chunk_bytes: int = 256 << 20  # a receiver refuses senders that want larger frames
    timeout_s: float = 30.0  # default deadline of a transfer, from send()/expect()
    connect_timeout_s: float = 10.0  # store connection + group rendezvous
    grace_s: float = 5.0  # after a transfer failed, how long its frames may still drain
    poll_interval_s: float = 0.02  # deadline checks and peer-abort polling
    # A pair idle this long is torn down (and re-joined on next use). It bounds the one
    # wait a receiver pair keeps posted between transfers, so it stays below the group's
    # timeout (NCCL's watchdog would abort the communicator under it).
    idle_timeout_s: float = 300.0
    # The process group's timeout: NCCL's watchdog aborts an op that outlives it. Every
    # wait of the transport stays below it (kv_transfer.completion.WaitBudget). gloo ops
    # time out only inside a wait, which the same clamp bounds.
    group_timeout_s: float = 600.0
    # Pair groups one process may hold (an NCCL communicator costs ~100 MB of GPU memory).
    # At the cap the least recently used idle group is torn down for a new one; a group
    # with a transfer in flight never is. 0 = no cap.
    max_pair_groups: int = 64
    # The cluster secret's file (common.cluster_secret): both sides of a join prove they
    # hold it (kv_transfer.rendezvous). None = peers are not authenticated.
    cluster_secret_file: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if not 0 < self.chunk_bytes <= self.max_chunk_bytes:
            raise ValueError("need 0 < chunk_bytes <= max_chunk_bytes")
        if self.direct_min_bytes < 0:
            raise ValueError("direct_min_bytes must be >= 0")
        if not 2 <= self.pipeline_depth <= 64:
            raise ValueError("pipeline_depth must be in [2, 64]")
        for name in ("timeout_s", "connect_timeout_s", "grace_s", "poll_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if not 0 < self.idle_timeout_s < self.group_timeout_s:
            raise ValueError("need 0 < idle_timeout_s < group_timeout_s")
        if self.max_pair_groups < 0:
            raise ValueError("max_pair_groups must be >= 0 (0 = no cap)")
