"""KV transfer of one 4k-token prompt per KV cache dtype: bf16 (``kv_cache_dtype: auto``
on a bf16 model), fp8 and int8 (engine/kv_quant.py: 64 one-byte codes + a float32 scale per
row, 68 bytes against bf16's 128), and fp32 for scale.

Two processes on loopback, as in the bandwidth benchmark: this one sends from one
``TorchDistSender`` per dtype, a spawned peer lands into one ``TorchDistReceiver`` per dtype.
The default model's geometry (30 layers, 3 KV heads, head_dim 64, 16-token blocks), the
layer-first order, whole-mode transfers of the prompt's 256 blocks, source ids one run and
destination ids another (a fresh prefill and a fresh reservation). Wall time is ``send()``
until the sender's transfer is DONE (the receiver landed every block and said so); medians
over the reps, dtypes interleaved rep by rep. Bytes are the KV payload the transfer moved.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from benchmarks._kv_pair import GEOMETRY, MODEL
from common.env import apply_offline_defaults
from engine import kv_quant
from engine.kv_cache import KVCache, KVLayout
from kv_transfer.receiver import TorchDistReceiver
from kv_transfer.sender import TorchDistSender
from kv_transfer.types import PeerAddress, RecvSpec, SendSpec, TransferConfig, TransferState

DTYPES = ("bfloat16", kv_quant.FP8, kv_quant.INT8, "float32")
BASELINE = "bfloat16"
PROMPT_TOKENS = 4096
NUM_BLOCKS = PROMPT_TOKENS // GEOMETRY["block_size"]
CACHE_BLOCKS = NUM_BLOCKS + 32
SRC = tuple(range(8, 8 + NUM_BLOCKS))
DST = tuple(range(24, 24 + NUM_BLOCKS))
GOAL = 0.55  # fp8 bytes and time as a share of bf16's


def _cache(dtype: str) -> KVCache:
    cache = KVCache(KVLayout(**GEOMETRY, num_blocks=CACHE_BLOCKS, dtype=dtype))
    if kv_quant.is_quantized(dtype):  # real rows: codes and scales
        values = torch.randn(*cache.tensor.shape[:-1], GEOMETRY["head_dim"])
        cache.tensor.copy_(kv_quant.quantize(values, dtype))
    else:
        cache.tensor.normal_()
    return cache


def _peer(conn: Connection, config: TransferConfig) -> None:
    apply_offline_defaults()
    torch.set_num_threads(1)
    receivers = {d: TorchDistReceiver(_cache(d), MODEL, config) for d in DTYPES}
    conn.send({d: str(r.address) for d, r in receivers.items()})
    while (msg := conn.recv()) is not None:
        dtype, tid = msg
        receivers[dtype].expect(RecvSpec(tid, DST, timeout_s=120), lambda _: None)
        conn.send(True)
    for receiver in receivers.values():
        receiver.close()
    conn.send("bye")


def measure(config: TransferConfig, reps: int) -> list[dict[str, Any]]:
    """One row per dtype: bytes, median ms, GB/s and the ratios to bf16."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    peer = ctx.Process(target=_peer, args=(child, config), daemon=True)
    peer.start()
    addresses = {d: PeerAddress.parse(a) for d, a in conn.recv().items()}
    senders = {d: TorchDistSender(_cache(d), MODEL, config) for d in DTYPES}
    times: dict[str, list[float]] = {d: [] for d in DTYPES}
    nbytes: dict[str, int] = {}
    try:
        for rep in range(reps + 1):  # rep 0 sets the pairs up and warms the buffers
            for dtype in DTYPES:
                tid = f"dtype-{dtype}-{rep}"
                conn.send((dtype, tid))
                conn.recv()
                start = time.perf_counter()
                transfer = senders[dtype].send(SendSpec(tid, addresses[dtype], SRC), lambda _: None)
                state = transfer.wait(120)
                elapsed = time.perf_counter() - start
                if state is not TransferState.DONE:
                    raise RuntimeError(f"{dtype} transfer failed: {transfer.error}")
                if rep:
                    times[dtype].append(elapsed)
                nbytes[dtype] = NUM_BLOCKS * senders[dtype].cache.layout.bytes_per_block
    finally:
        for sender in senders.values():
            sender.close()
        conn.send(None)
        conn.recv()
        peer.join(timeout=10)
    base_s = statistics.median(times[BASELINE])
    rows = []
    for dtype in DTYPES:
        wall = statistics.median(times[dtype])
        rows.append(
            {
                "kv_dtype": dtype,
                "bytes": nbytes[dtype],
                "mib": nbytes[dtype] / 2**20,
                "ms": 1e3 * wall,
                "gbps": nbytes[dtype] / wall / 1e9,
                "bytes_vs_bf16": nbytes[dtype] / nbytes[BASELINE],
                "time_vs_bf16": wall / base_s,
                "reps": reps,
            }
        )
    return rows


def goal(rows: list[dict[str, Any]]) -> dict[str, Any]:
    fp8 = next(r for r in rows if r["kv_dtype"] == kv_quant.FP8)
    ok = fp8["bytes_vs_bf16"] <= GOAL and fp8["time_vs_bf16"] <= GOAL
    return {
        "fp8_bytes_vs_bf16": fp8["bytes_vs_bf16"],
        "fp8_time_vs_bf16": fp8["time_vs_bf16"],
        "pass": ok,
    }
