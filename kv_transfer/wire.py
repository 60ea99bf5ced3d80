"""The wire protocol over one (sender, receiver) pair's 2-rank process group.

Every message is a *frame* (a byte tensor whose first 128 bytes are a :class:`Header`, 16
little-endian int64 words, then a payload) or a *direct piece* (a contiguous slice of the
KV cache, no header; see :mod:`kv_transfer.segments`). Control frames are always
``CTRL_BYTES`` (4 KiB): BEGIN and ACCEPT list the side's long runs after the header, so
the run exchange costs no extra message or round trip. Data sizes are always known to the
receiving side in advance — gloo aborts the process if a message is larger than the posted
buffer, and NCCL needs exact sizes — so they follow from the plan both sides compute from
BEGIN and the two run lists. NCCL has no tags and gloo matches per tag in order, so each
direction's messages are posted by the receiving side in exactly the order they are sent.

One transfer, sender S → receiver R (``ctrl`` = TAG_CTRL, ``data`` = TAG_DATA)::

    S ctrl BEGIN(key, seq, num_blocks, mode, chunk_bytes, direct_min; source runs) → R
    R ctrl ACCEPT(depth; destination runs) | REJECT(reason)                       → S
    S data for each frame i: DATA(i) header + staged payload, then its direct pieces
           (or ABORT(i) + fillers, see below)                                     → R
    R ctrl RESULT(reason; OK = every block landed)                                → S

R keeps ``depth`` frames (announced in ACCEPT) posted ahead of the one it lands — first
message and direct pieces, in the sender's order, since messages match in posting order
(:func:`kv_transfer.segments.post_limit`). Pieces land straight in the destination blocks,
so they are posted only once R has claimed the transfer, and only into its blocks. When
the sender gives up at frame i it sends ABORT(i) instead of DATA(i), then fillers for
everything else R has posted by then — that same rule tells it which: filler ABORT frames
of the planned sizes for the later first messages, and scratch of the planned sizes for
the pieces of frame i and of those frames. Between transfers the sender may send
``ctrl CANCEL(key)`` to fail a transfer R is still waiting for (no reply).

Every frame carries the transfer key (hash of its id), the pair's transfer sequence number
and the chunk index; a frame that does not match what the receiver expects is a
:class:`~kv_transfer.errors.ProtocolError`: it fails the transfer (whose blocks are freed,
never decoded) and tears the pair down. Its staged payload is never landed, and no receive
is ever posted into blocks of another transfer, so a stale or misordered frame can never
write into the wrong blocks.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch

from kv_transfer.errors import (
    ProtocolError,
    TransferAborted,
    TransferError,
    TransferRejected,
    TransferTimeout,
)
from kv_transfer.types import PROTOCOL_VERSION, TransferMode

HEADER_WORDS = 16  # 10 used, the rest zero; 128 bytes keep the payload 64-byte aligned
HEADER_BYTES = HEADER_WORDS * 8
CTRL_RUNS = 248  # runs (two int64 positions each) a control frame lists after its header
CTRL_BYTES = HEADER_BYTES + 16 * CTRL_RUNS  # every control frame: 4 KiB
_LAYOUT = f"<{HEADER_WORDS}q"  # little-endian int64 words
_USED = 10
_RESERVED = (0,) * (HEADER_WORDS - _USED)
MAGIC = (0x4B565846 << 16) | PROTOCOL_VERSION  # "KVXF" + version
TAG_CTRL = 1
TAG_DATA = 2


class Kind(IntEnum):
    BEGIN = 1
    DATA = 2
    ABORT = 3
    CANCEL = 4
    ACCEPT = 5
    REJECT = 6
    RESULT = 7


class Reason(IntEnum):
    OK = 0
    UNKNOWN_TRANSFER = 1  # the receiver never registered this id (or forgot it long ago)
    NOT_PENDING = 2  # registered but already started or finished
    BLOCK_COUNT = 3  # sender and receiver disagree on the number of blocks
    ABORTED = 4  # the side that sent this reason aborted
    TIMEOUT = 5  # the side that sent this reason hit its deadline
    CLOSING = 6  # the endpoint is shutting down
    FAILED = 7  # failed on that side for another reason (its logs say why)
    BAD_REQUEST = 8  # unknown mode or a chunk size over the receiver's limit


MODE_CODES = {TransferMode.WHOLE: 0, TransferMode.LAYERWISE: 1}
CODE_MODES = {v: k for k, v in MODE_CODES.items()}


@functools.lru_cache(maxsize=4096)
def transfer_key(transfer_id: str) -> int:
    """63-bit stable hash of a transfer id; fits an int64 header word."""
    digest = hashlib.blake2b(transfer_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True, slots=True)
class Header:
    kind: Kind
    key: int  # transfer_key of the transfer this frame belongs to
    seq: int  # per-pair transfer sequence number, from 1
    index: int = 0  # chunk index for DATA / ABORT
    num_blocks: int = 0  # BEGIN
    code: int = 0  # BEGIN: mode code; REJECT / RESULT / ABORT / CANCEL: Reason
    value: int = 0  # BEGIN: chunk_bytes; ACCEPT: receiver's pipeline depth; DATA: payload bytes
    runs: int = 0  # BEGIN / ACCEPT: number of runs listed after the header
    direct: int = 0  # BEGIN: direct_min_bytes; DATA: number of direct pieces that follow

    def write(self, frame: torch.Tensor) -> None:
        words = (MAGIC, int(self.kind), self.key, self.seq, self.index, self.num_blocks,
                 self.code, self.value, self.runs, self.direct, *_RESERVED)  # fmt: skip
        if frame.is_cuda:
            frame[:HEADER_BYTES].copy_(torch.tensor(words, dtype=torch.int64).view(torch.uint8))
        else:  # struct on the buffer: a few torch calls per frame add up on a slow CPU
            struct.pack_into(_LAYOUT, frame.numpy(), 0, *words)

    @classmethod
    def read(cls, frame: torch.Tensor) -> Header:
        if frame.is_cuda:
            words = struct.unpack(_LAYOUT, frame[:HEADER_BYTES].cpu().numpy().tobytes())
        else:
            words = struct.unpack_from(_LAYOUT, frame.numpy(), 0)
        if words[0] != MAGIC:
            raise ProtocolError(f"bad frame magic {words[0]:#x} (peer protocol or desync)")
        try:
            kind = Kind(words[1])
        except ValueError:
            raise ProtocolError(f"unknown frame kind {words[1]}") from None
        return cls(kind, *words[2:_USED])


def write_runs(frame: torch.Tensor, runs: Sequence[tuple[int, int]]) -> None:
    """List ``runs`` (position ranges) after the header of a control frame."""
    if len(runs) > CTRL_RUNS:
        raise ValueError(f"at most {CTRL_RUNS} runs fit a control frame")
    if runs:
        body = torch.tensor(runs, dtype=torch.int64).view(-1).view(torch.uint8)
        frame[HEADER_BYTES : HEADER_BYTES + body.numel()].copy_(body)


def read_runs(frame: torch.Tensor, count: int, num_blocks: int) -> tuple[tuple[int, int], ...]:
    """The ``count`` runs listed in a control frame; ProtocolError unless they are sorted,
    disjoint, non-empty ranges inside ``[0, num_blocks)``."""
    if not 0 <= count <= CTRL_RUNS:
        raise ProtocolError(f"{count} runs announced, at most {CTRL_RUNS} fit")
    body = frame[HEADER_BYTES : HEADER_BYTES + 16 * count].cpu().view(torch.int64)
    flat = body.tolist()
    runs = tuple(zip(flat[::2], flat[1::2], strict=True))
    bounds = [b for run in runs for b in run]
    if (
        any(not 0 <= b <= num_blocks for b in bounds)
        or any(a >= b for a, b in runs)
        or any(a > b for a, b in itertools.pairwise(bounds))
    ):
        raise ProtocolError(f"invalid runs for {num_blocks} blocks: {runs[:8]}")
    return runs


def reason_error(reason: int, transfer_id: str, peer: str) -> TransferError:
    """The local error for a non-OK reason that ``peer`` reported."""
    try:
        name = Reason(reason).name.lower()
    except ValueError:
        name = f"reason {reason}"
    message = f"{transfer_id}: {peer} reported {name}"
    if reason == Reason.ABORTED or reason == Reason.CLOSING:
        return TransferAborted(message, by_peer=True)
    if reason == Reason.TIMEOUT:
        return TransferTimeout(message, by_peer=True)
    if reason == Reason.FAILED:
        return TransferError(message, by_peer=True)
    return TransferRejected(message, by_peer=True)


def error_reason(error: TransferError | None) -> Reason:
    """The reason code that reports a local failure to the peer."""
    if error is None:
        return Reason.OK
    if isinstance(error, TransferTimeout):
        return Reason.TIMEOUT
    if isinstance(error, TransferAborted):
        return Reason.ABORTED
    return Reason.FAILED


@dataclass(frozen=True, slots=True)
class Chunk:
    """Layers [layer_start, layer_stop) × blocks [block_start, block_stop) of a transfer."""

    index: int
    layer_start: int
    layer_stop: int
    block_start: int
    block_stop: int

    def nbytes(self, layer_block_bytes: int) -> int:
        layers = self.layer_stop - self.layer_start
        return layers * (self.block_stop - self.block_start) * layer_block_bytes

    def layers_complete(self, num_blocks: int) -> int:
        """How many leading layers are whole once this chunk (and all before it) landed."""
        return self.layer_stop if self.block_stop == num_blocks else self.layer_start


def plan_chunks(
    num_blocks: int,
    num_layers: int,
    layer_block_bytes: int,
    mode: TransferMode,
    chunk_bytes: int,
    *,
    ramp: bool = True,
    across_layers: bool = False,
) -> tuple[Chunk, ...]:
    """Split a transfer into frames of at most ``chunk_bytes`` (or one layer-block).

    Layer-major order. Whole mode packs several layers per frame when they fit; layer-wise
    mode never mixes layers, so a frame can leave as soon as its layer is computed. With
    ``across_layers`` (whole mode into page-first caches) every frame spans all layers and
    a range of positions instead, so that a run of blocks is one slice of each cache.

    A whole-mode transfer of several frames ramps up and down (1/8, 1/8, 1/4, 1/2 of a
    frame at each end): the first frame must be packed before anything moves and the last
    one landed after everything arrived, so small end frames shrink the part of the
    pack / send / land pipeline that cannot overlap (``ramp=False`` when nothing is packed).
    """
    per_layer = num_blocks * layer_block_bytes
    rects: list[tuple[int, int, int, int]] = []
    # Equal-sized frames (ceil-divided), rather than full frames and a small remainder.
    if across_layers:
        frames = -(-num_blocks // max(1, chunk_bytes // (num_layers * layer_block_bytes)))
        blocks_per = -(-num_blocks // frames)
        for start in range(0, num_blocks, blocks_per):
            rects.append((0, num_layers, start, min(num_blocks, start + blocks_per)))
    elif per_layer <= chunk_bytes:
        step = 1 if mode is TransferMode.LAYERWISE else max(1, chunk_bytes // per_layer)
        step = -(-num_layers // -(-num_layers // step))
        for start in range(0, num_layers, step):
            rects.append((start, min(num_layers, start + step), 0, num_blocks))
    else:
        pieces = -(-num_blocks // max(1, chunk_bytes // layer_block_bytes))
        blocks_per = -(-num_blocks // pieces)
        for layer in range(num_layers):
            for start in range(0, num_blocks, blocks_per):
                rects.append((layer, layer + 1, start, min(num_blocks, start + blocks_per)))
    if ramp and mode is TransferMode.WHOLE and len(rects) >= 3:
        by = not across_layers  # frames across layers stay across layers
        rects = [
            *_split(rects[0], RAMP_UP, by_layers=by),
            *rects[1:-1],
            *_split(rects[-1], RAMP_UP[::-1], by_layers=by),
        ]
    return tuple(Chunk(i, *rect) for i, rect in enumerate(rects))


RAMP_UP = (1, 1, 2, 4)  # relative sizes of the pieces the first frame is cut into


def _split(
    rect: tuple[int, int, int, int], weights: tuple[int, ...], *, by_layers: bool = True
) -> list[tuple[int, int, int, int]]:
    """Cut a chunk rectangle along layers (if ``by_layers`` and it has enough of them, else
    blocks) in proportion to ``weights``."""
    l0, l1, b0, b1 = rect
    by_layers = by_layers and l1 - l0 >= len(weights)
    lo, hi = (l0, l1) if by_layers else (b0, b1)
    if hi - lo < len(weights):
        return [rect]
    total, acc, cuts = sum(weights), 0, [lo]
    for i, w in enumerate(weights[:-1]):
        acc += w
        # at least one unit per piece, and room left for the pieces still to come
        cut = max(cuts[-1] + 1, lo + round((hi - lo) * acc / total))
        cuts.append(min(cut, hi - (len(weights) - 1 - i)))
    cuts.append(hi)
    if by_layers:
        return [(a, b, b0, b1) for a, b in itertools.pairwise(cuts)]
    return [(l0, l1, a, b) for a, b in itertools.pairwise(cuts)]
