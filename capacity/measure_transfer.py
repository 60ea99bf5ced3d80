"""KV transfer time vs bytes over a real kv_transfer pair, for a profile.

This process is the prefill side (a ``TorchDistSender`` over its own cache); a spawned
peer process is the decode side (a ``TorchDistReceiver``), the two joined by the pairwise
torch.distributed group the transport builds (gloo on CPU, on loopback). Both caches have
the engine's KV geometry and one torch thread, like workers on the local cluster. Each
size is a whole-request transfer of that many blocks (contiguous ids, so the transport
sends runs in place, as it does for freshly allocated blocks), timed from ``send()`` until
the sender reports DONE (the receiver has landed every block). The layer-wise mode
overlaps the same bytes with the prefill; the simulator models that overlap.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.kv_cache import KVCache

HOST = "127.0.0.1"
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Geometry:
    """KV cache geometry of both ends (the engine's ``KVLayout`` fields that matter)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    order: str


def _cache(geometry: Geometry, num_blocks: int) -> KVCache:
    from engine.kv_cache import KVCache, KVLayout

    return KVCache(KVLayout(**asdict(geometry), num_blocks=num_blocks))


def _peer(conn: Connection, geometry: Geometry, num_blocks: int, model: str) -> None:
    """Decode side: register each expected transfer, land it, until told to stop."""
    import torch

    from common.env import apply_offline_defaults
    from kv_transfer.receiver import TorchDistReceiver
    from kv_transfer.types import RecvSpec, TransferConfig

    apply_offline_defaults()
    torch.set_num_threads(1)
    cache = _cache(geometry, num_blocks)
    cache.tensor.fill_(1.0)  # fault the pages in before anything is timed
    receiver = TorchDistReceiver(cache, model, TransferConfig(host=HOST))
    conn.send(str(receiver.address))
    while True:
        command = conn.recv()
        if command is None:
            break
        transfer_id, block_ids = command
        receiver.expect(RecvSpec(transfer_id, block_ids, timeout_s=TIMEOUT_S), lambda _: None)
        conn.send("ready")
    receiver.close()
    conn.send("bye")


def transfer_points(
    geometry: Geometry, sizes_blocks: tuple[int, ...], repeats: int, model: str
) -> list[tuple[int, float]]:
    """``(bytes, median seconds)`` per size in blocks, over a real sender/receiver pair."""
    import torch

    from engine.kv_cache import KVLayout
    from kv_transfer.sender import TorchDistSender
    from kv_transfer.types import PeerAddress, SendSpec, TransferConfig, TransferState

    num_blocks = max(sizes_blocks)
    block_bytes = KVLayout(**asdict(geometry), num_blocks=1).bytes_per_block
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    peer = ctx.Process(target=_peer, args=(child, geometry, num_blocks, model), daemon=True)
    peer.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sender = None
    try:
        if not conn.poll(TIMEOUT_S):
            raise RuntimeError("KV transfer peer did not start")
        address = PeerAddress.parse(conn.recv())
        cache = _cache(geometry, num_blocks)
        cache.tensor.normal_()
        sender = TorchDistSender(cache, model, TransferConfig(host=HOST))
        count = 0
        points = []
        for size in (sizes_blocks[0], *sizes_blocks):  # the first size twice: warm-up
            ids = tuple(range(size))
            samples = []
            for _ in range(repeats):
                count += 1
                conn.send((f"profile-{count}", ids))
                conn.recv()
                start = time.perf_counter()
                transfer = sender.send(SendSpec(f"profile-{count}", address, ids), lambda _: None)
                state = transfer.wait(TIMEOUT_S)
                samples.append(time.perf_counter() - start)
                if state is not TransferState.DONE:
                    raise RuntimeError(f"KV transfer of {size} blocks failed: {transfer.error}")
            points.append((size * block_bytes, statistics.median(samples)))
        return points[1:]
    finally:
        if sender is not None:
            sender.close()
        torch.set_num_threads(threads)
        if peer.is_alive():
            conn.send(None)
            if conn.poll(10):
                conn.recv()
        peer.join(timeout=10)
        if peer.is_alive():
            peer.kill()
