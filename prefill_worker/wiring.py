"""The one place a prefill worker is put together: :func:`build_prefill_app`.

The runtime calls it (it is the role's :data:`~worker.app.AppType`) with the defaults:
an engine built from ``config.engine`` and the torch.distributed KV sender. The
in-process tests call the same function with an engine they already loaded and the fake
transport's ``FakeNetwork.sender``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from common.metrics import Metrics
from engine.async_engine import AsyncEngine
from engine.kv_cache import KVCache
from engine.llm_engine import LLMEngine
from kv_transfer.interfaces import KVSender
from kv_transfer.prometheus import prometheus_budget
from kv_transfer.sender import TorchDistSender
from kv_transfer.types import TransferConfig
from prefill_worker.worker import PrefillApp
from worker.config import WorkerConfig

# (the engine's KV cache, model name, transfer config) → a KV sender that reads that cache
SenderFactory = Callable[[KVCache, str, TransferConfig], KVSender]


def build_prefill_app(
    config: WorkerConfig,
    worker_id: str,
    metrics: Metrics,
    *,
    engine: LLMEngine | None = None,
    make_sender: SenderFactory | None = None,
) -> PrefillApp:
    """A serving prefill app (its engine thread started); call inside the event loop.

    ``engine``: an idle engine to serve (default: one built from ``config.engine``).
    ``make_sender``: the KV transport (default: torch.distributed, named after the worker
    and the process — receivers tell pairs apart by name, so a restarted worker must not
    reuse its old one).
    """
    llm = engine if engine is not None else LLMEngine(config.engine)
    if make_sender is None:
        make_sender = functools.partial(
            TorchDistSender,
            name=f"{worker_id}-{os.getpid()}",
            budget=prometheus_budget(metrics, "sender", config.kv_transfer.max_pair_groups),
        )
    sender = make_sender(llm.kv_cache, llm.model_config.name, config.kv_transfer)
    return PrefillApp(config, AsyncEngine(llm), sender, metrics)
