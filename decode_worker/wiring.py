"""The one place a decode (or colocated) worker is put together: :func:`build_decode_app`.

The runtime calls it (it is the role's :data:`~worker.app.AppType`) with the defaults:
an engine built from ``config.engine``, the torch.distributed KV receiver (decode role
only: ``config.takes_transfers``) and the gRPC prefill client. The in-process tests call
the same function with an engine they already loaded, the fake transport's
``FakeNetwork.receiver`` and a :class:`~decode_worker.prefill_fake.FakePrefillClient`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from common.cluster_secret import load_secret
from common.metrics import Metrics
from decode_worker.prefill_client import GrpcPrefillClient, PrefillClient
from decode_worker.worker import DecodeApp
from engine.async_engine import AsyncEngine
from engine.kv_cache import KVCache
from engine.llm_engine import LLMEngine
from kv_transfer.interfaces import KVReceiver
from kv_transfer.prometheus import prometheus_budget
from kv_transfer.receiver import TorchDistReceiver
from kv_transfer.types import TransferConfig
from worker.config import WorkerConfig

# (the engine's KV cache, model name, transfer config) → a KV receiver landing in that cache
ReceiverFactory = Callable[[KVCache, str, TransferConfig], KVReceiver]


def build_decode_app(
    config: WorkerConfig,
    worker_id: str,
    metrics: Metrics,
    *,
    engine: LLMEngine | None = None,
    make_receiver: ReceiverFactory | None = None,
    prefill: PrefillClient | None = None,
) -> DecodeApp:
    """A serving decode app (its engine thread started); call inside the event loop.

    ``engine``: an idle engine to serve (default: one built from ``config.engine``).
    ``make_receiver``: the KV transport (default: torch.distributed); not called for a
    colocated worker. ``prefill``: how prefill workers are called (default: gRPC).
    """
    llm = engine if engine is not None else LLMEngine(config.engine)
    receiver = None
    if config.takes_transfers:
        make_receiver = make_receiver or functools.partial(
            TorchDistReceiver,
            budget=prometheus_budget(metrics, "receiver", config.kv_transfer.max_pair_groups),
        )
        receiver = make_receiver(llm.kv_cache, llm.model_config.name, config.kv_transfer)
    if prefill is None:
        prefill = GrpcPrefillClient(load_secret(config.cluster_secret_file))
    client = prefill
    return DecodeApp(config, worker_id, AsyncEngine(llm), receiver, client, metrics)
