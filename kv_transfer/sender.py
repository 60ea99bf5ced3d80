"""Prefill side of the torch.distributed transport: :class:`TorchDistSender`.

One :class:`~kv_transfer.send_pair.SenderPair` (and thread) per receiver address, created
on the first transfer to it; a monitor thread enforces deadlines and polls the receivers'
abort flags. A transfer's life and the failure handling are described in
:mod:`kv_transfer.send_pair`.
"""

from __future__ import annotations

import os
import threading
import uuid

from engine.kv_cache import KVCache
from kv_transfer.budget import PairBudget
from kv_transfer.completion import record_ready
from kv_transfer.interfaces import KVSender
from kv_transfer.metrics import TransferStats
from kv_transfer.send_pair import SenderPair
from kv_transfer.torch_dist import Monitor, handshake_for
from kv_transfer.transfer import ReleaseFn, SendTransfer
from kv_transfer.types import PeerAddress, SendSpec, TransferConfig


class TorchDistSender(KVSender):
    """Ships blocks of ``cache`` to any number of receivers, one pair (and thread) each."""

    def __init__(
        self,
        cache: KVCache,
        model: str,
        config: TransferConfig | None = None,
        *,
        name: str | None = None,
        stats: TransferStats | None = None,
        budget: PairBudget | None = None,
    ) -> None:
        self.cache = cache
        self.config = config or TransferConfig()
        # Pair groups of this sender (share one with a receiver for a per-process cap).
        self.budget = budget if budget is not None else PairBudget(self.config.max_pair_groups)
        self.handshake = handshake_for(cache, model)
        # Unique per process incarnation: a restarted prefill worker is a new peer.
        self.name = name or f"sender-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.stats = stats or TransferStats()
        self._lock = threading.Lock()
        self._pairs: dict[PeerAddress, SenderPair] = {}
        self._closed = False
        self._monitor = Monitor(self.config.poll_interval_s, self._tick, "kv-send-monitor")
        device = cache.device
        self._record_ready = (lambda: record_ready(device)) if device.type == "cuda" else None

    def send(self, spec: SendSpec, release: ReleaseFn) -> SendTransfer:
        layout = self.cache.layout
        if max(spec.block_ids) >= layout.num_blocks:
            raise ValueError(f"block id out of range for a cache of {layout.num_blocks} blocks")
        with self._lock:
            if self._closed:
                raise RuntimeError("sender is closed")
            transfer = SendTransfer(
                spec.transfer_id,
                spec.block_ids,
                layout.num_layers,
                spec.timeout_s or self.config.timeout_s,
                release,
                mode=spec.mode,
                stats=self.stats,
                record_ready=self._record_ready,
            )
            pair = self._pairs.get(spec.peer)
            if pair is None:
                pair = SenderPair(
                    spec.peer, self.cache, self.handshake, self.config, self.name, self.budget
                )
                self._pairs[spec.peer] = pair
            pair.submit(transfer)
        return transfer

    def peers(self) -> tuple[str, ...]:
        """Receiver addresses (``host:port``) this sender holds a pair group with, most
        recently used last — what a worker reports so the router can prefer them."""
        return tuple(str(key) for key in self.budget.holders())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pairs = list(self._pairs.values())
        for pair in pairs:
            pair.close()
        self._monitor.stop()

    def _tick(self, now: float) -> None:
        with self._lock:
            pairs = list(self._pairs.values())
        for pair in pairs:
            pair.tick(now)
