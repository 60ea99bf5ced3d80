"""Decode side of the torch.distributed transport: :class:`TorchDistReceiver`.

The receiver hosts the rendezvous store (its ``address`` is what the prefill worker is
told), answers joins on an acceptor thread (:mod:`kv_transfer.rendezvous`), runs one
:class:`~kv_transfer.recv_pair.ReceiverPair` thread per sender, and keeps the expected
transfers in :class:`~kv_transfer.expected.ExpectedTransfers`, whose deadlines a monitor
thread enforces. A transfer's life and the failure handling are described in
:mod:`kv_transfer.recv_pair`.
"""

from __future__ import annotations

import threading

from common.cluster_secret import load_secret
from engine.kv_cache import KVCache
from kv_transfer.budget import PairBudget
from kv_transfer.expected import ExpectedTransfers
from kv_transfer.interfaces import KVReceiver
from kv_transfer.metrics import TransferStats
from kv_transfer.recv_pair import ReceiverPair
from kv_transfer.rendezvous import Acceptor, start_store
from kv_transfer.torch_dist import Monitor, handshake_for
from kv_transfer.transfer import RecvTransfer, ReleaseFn
from kv_transfer.types import Handshake, PeerAddress, RecvSpec, TransferConfig


class TorchDistReceiver(KVReceiver):
    """Lands transfers from any number of senders into ``cache``."""

    def __init__(
        self,
        cache: KVCache,
        model: str,
        config: TransferConfig | None = None,
        *,
        stats: TransferStats | None = None,
        budget: PairBudget | None = None,
    ) -> None:
        self.cache = cache
        self.config = config or TransferConfig()
        self.handshake = handshake_for(cache, model)
        self.stats = stats or TransferStats()
        cfg = self.config
        # Pair groups of this receiver (share one with a sender for a per-process cap).
        self.budget = budget if budget is not None else PairBudget(cfg.max_pair_groups)
        store, port = start_store(cfg.host, cfg.port, cfg.connect_timeout_s)
        self._store = store
        self._address = PeerAddress(cfg.host, port)
        self._expected = ExpectedTransfers(store, self.stats, cfg.max_chunk_bytes)
        self._lock = threading.Lock()
        self._pairs: dict[int, ReceiverPair] = {}
        self._names: dict[int, str] = {}
        self._acceptor = Acceptor(
            store,
            self.handshake,
            self._on_join,
            cfg.group_timeout_s,
            load_secret(cfg.cluster_secret_file),
        )
        self._monitor = Monitor(cfg.poll_interval_s, self._expected.expire, "kv-recv-monitor")

    @property
    def address(self) -> PeerAddress:
        return self._address

    def expect(self, spec: RecvSpec, release: ReleaseFn) -> RecvTransfer:
        layout = self.cache.layout
        if max(spec.block_ids) >= layout.num_blocks:
            raise ValueError(f"block id out of range for a cache of {layout.num_blocks} blocks")
        return self._expected.add(
            spec, layout.num_layers, spec.timeout_s or self.config.timeout_s, release
        )

    def close(self) -> None:
        self._acceptor.stop()
        self._expected.close()
        self._monitor.stop()

    def num_pairs(self) -> int:
        with self._lock:
            return len(self._pairs)

    def peers(self) -> tuple[str, ...]:
        """Names of the senders this receiver holds a pair group with."""
        with self._lock:
            return tuple(sorted(self._names[i] for i in self._pairs))

    def _on_join(self, index: int, name: str, handshake: Handshake) -> str | None:
        if self._expected.closed:
            return "receiver is closing"
        pair = ReceiverPair(
            index,
            name,
            self.cache,
            self.config,
            self._address,
            self._expected,
            on_exit=self._forget_pair,
            budget=self.budget,
            flags=self._store,
        )
        if not self.budget.acquire(index, pair.evict, 0.0, wait=False):
            return (
                f"pair budget full: {self.config.max_pair_groups} groups, all with a "
                "transfer in flight"
            )
        with self._lock:
            self._pairs[index] = pair
            self._names[index] = name
        pair.start()
        return None

    def _forget_pair(self, index: int) -> None:
        with self._lock:
            self._pairs.pop(index, None)
            self._names.pop(index, None)
