"""The two processes of the KV transfer benchmark and what it times between them.

This process is the prefill side: one ``TorchDistSender`` per KV cache order (layer-first
and page-first, ``engine.kv_cache``), each over its own cache. A spawned peer is the decode
side: one ``TorchDistReceiver`` per order, and the rank 0 of a plain gloo pair for the
transport's limit. Both use the default model's KV geometry (SmolLM2-135M), caches of
``CACHE_BLOCKS`` blocks and one torch thread each, like workers on the 2-core local
cluster. The peer is driven over a pipe: ``expect`` a transfer, post a ``raw`` receive,
report its ``cpu`` time, ``stop``.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from benchmarks._block_ids import DecodeSide, PrefillSide, contiguous_ids, scattered_ids
from common.env import apply_offline_defaults
from engine.kv_cache import ORDERS, KVCache, KVLayout
from kv_transfer.receiver import TorchDistReceiver
from kv_transfer.rendezvous import connect_store, new_pair_group, start_store
from kv_transfer.sender import TorchDistSender
from kv_transfer.types import PeerAddress, RecvSpec, SendSpec, TransferConfig, TransferState

MODEL = "SmolLM2-135M-Instruct"
GEOMETRY = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "block_size": 16}
BLOCK_BYTES = KVLayout(**GEOMETRY, num_blocks=1).bytes_per_block
CACHE_BLOCKS = 1024  # per side and order: 720 MiB of KV
WARMUP = 1000  # requests (1-64 blocks) through each side's allocator before any draw
HOST = "127.0.0.1"
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Sample:
    wall_s: float
    cpu_s: float  # CPU time of both processes (all threads) during the transfer


def new_cache(order: str) -> KVCache:
    return KVCache(KVLayout(**GEOMETRY, num_blocks=CACHE_BLOCKS, order=order))


def _raw_pair(store: dist.Store, rank: int) -> dist.ProcessGroup:
    """A plain gloo pair on loopback, built the way the transport builds its pairs."""
    return new_pair_group(store, 0, rank, torch.device("cpu"), HOST, TIMEOUT_S)


def _peer(conn: Connection, config: TransferConfig) -> None:
    apply_offline_defaults()
    torch.set_num_threads(1)
    receivers = {}
    for order in ORDERS:
        cache = new_cache(order)
        cache.tensor.fill_(1.0)  # fault the pages in before anything is timed
        receivers[order] = TorchDistReceiver(cache, MODEL, config)
    store, port = start_store(HOST, 0, TIMEOUT_S)
    conn.send(({order: str(r.address) for order, r in receivers.items()}, port))
    raw = _raw_pair(store, 0)
    ack = torch.zeros(1)
    buffers: dict[int, torch.Tensor] = {}
    while True:
        cmd, arg = conn.recv()
        if cmd == "expect":
            order, tid, ids = arg
            receivers[order].expect(RecvSpec(tid, ids, timeout_s=120), lambda _: None)
            conn.send(time.process_time())
        elif cmd == "raw":
            buf = buffers.setdefault(arg, torch.ones(arg // 4))
            work = raw.recv([buf], 1, 0)
            conn.send(time.process_time())  # the recv is posted; the sender may start
            work.wait()
            raw.send([ack], 1, 1).wait()
        elif cmd == "cpu":
            conn.send(time.process_time())
        else:
            for receiver in receivers.values():
                receiver.close()
            conn.send("bye")
            return


class Bench:
    """The prefill side: senders per order, the raw pair, and the block ids to use."""

    def __init__(self, config: TransferConfig) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self._peer = ctx.Process(target=_peer, args=(child, config), daemon=True)
        self._peer.start()
        addresses, raw_port = self.conn.recv()
        self.raw = _raw_pair(connect_store(PeerAddress(HOST, raw_port), TIMEOUT_S), 1)
        self.senders: dict[str, TorchDistSender] = {}
        self.addresses = {order: PeerAddress.parse(a) for order, a in addresses.items()}
        for order in ORDERS:
            cache = new_cache(order)
            cache.tensor.normal_()
            self.senders[order] = TorchDistSender(cache, MODEL, config)
        self.rng = random.Random(0)
        self.count = 0
        self.prefill = PrefillSide(CACHE_BLOCKS, random.Random(1), WARMUP)
        self.decode = DecodeSide(CACHE_BLOCKS, random.Random(2), WARMUP)

    def close(self) -> None:
        # Senders first: dropping their groups closes the sockets, which ends the peer's
        # pair threads (idle ones wait in gloo for the next BEGIN). A process that exits
        # with such threads in two receivers was seen to abort at exit (torch 2.13).
        for sender in self.senders.values():
            sender.close()
        self.raw = None
        self.conn.send(("stop", None))
        self.conn.recv()
        self._peer.join(timeout=10)

    def ids(self, kind: str, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Source and destination ids, drawn independently (different ids, different runs)."""
        if kind == "realistic":
            return self.prefill.draw(n), self.decode.draw(n)
        draw = contiguous_ids if kind == "contiguous" else scattered_ids
        return draw(n, CACHE_BLOCKS, self.rng), draw(n, CACHE_BLOCKS, self.rng)

    def expect(self, order: str, dst: tuple[int, ...]) -> tuple[str, float]:
        """Register a transfer on the peer; returns its id and the peer's CPU time."""
        self.count += 1
        tid = f"bench-{self.count}"
        self.conn.send(("expect", (order, tid, dst)))
        return tid, self.conn.recv()

    def _peer_cpu(self) -> float:
        self.conn.send(("cpu", None))
        return self.conn.recv()

    def ours(self, order: str, src: tuple[int, ...], dst: tuple[int, ...]) -> Sample:
        """One whole-mode transfer: ``send()`` until the sender's transfer is DONE."""
        tid, peer_cpu = self.expect(order, dst)
        cpu, start = time.process_time(), time.perf_counter()
        spec = SendSpec(tid, self.addresses[order], src)
        transfer = self.senders[order].send(spec, lambda _: None)
        state = transfer.wait(120)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        if state is not TransferState.DONE:
            raise RuntimeError(f"transfer failed: {transfer.error}")
        return Sample(elapsed, cpu + self._peer_cpu() - peer_cpu)

    def gloo(self, nbytes: int, buf: torch.Tensor) -> Sample:
        """One contiguous tensor over the plain gloo pair, and the peer's one-element ack."""
        ack = torch.zeros(1)
        self.conn.send(("raw", nbytes))
        peer_cpu = self.conn.recv()
        cpu, start = time.process_time(), time.perf_counter()
        self.raw.send([buf], 0, 0).wait()
        self.raw.recv([ack], 0, 1).wait()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        return Sample(elapsed, cpu + self._peer_cpu() - peer_cpu)
