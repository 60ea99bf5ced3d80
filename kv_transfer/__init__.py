"""KV transfer between prefill and decode workers.

Roles: :class:`KVSender` (prefill side) and :class:`KVReceiver` (decode side); each
transfer is a :class:`Transfer` handle (state / wait / abort) on a state machine (pending
→ transferring → done | failed) that transports drive through its
:class:`~kv_transfer.transfer.TransferControl`, with a ``release`` callback that returns
the caller's blocks exactly once. Implementations: the torch.distributed transport
(:class:`TorchDistSender` / :class:`TorchDistReceiver`, gloo on CPU, NCCL on CUDA) and an
in-process fake (:mod:`kv_transfer.fake`) for tests of the workers.

The transport modules import torch.distributed; import them lazily from here so that
``kv_transfer.types`` and friends stay cheap for callers that only need the values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kv_transfer.errors import (
    IncompatiblePeer,
    PeerLost,
    ProtocolError,
    TransferAborted,
    TransferError,
    TransferRejected,
    TransferTimeout,
)
from kv_transfer.types import (
    Handshake,
    PeerAddress,
    RecvSpec,
    Role,
    SendSpec,
    TransferConfig,
    TransferMode,
    TransferState,
)

if TYPE_CHECKING:
    from kv_transfer.interfaces import KVReceiver, KVSender
    from kv_transfer.metrics import TransferMetrics, TransferStats
    from kv_transfer.receiver import TorchDistReceiver
    from kv_transfer.sender import TorchDistSender
    from kv_transfer.transfer import RecvTransfer, SendTransfer, Transfer

_LAZY = {
    "KVSender": "kv_transfer.interfaces",
    "KVReceiver": "kv_transfer.interfaces",
    "Transfer": "kv_transfer.transfer",
    "SendTransfer": "kv_transfer.transfer",
    "RecvTransfer": "kv_transfer.transfer",
    "TransferMetrics": "kv_transfer.metrics",
    "TransferStats": "kv_transfer.metrics",
    "TorchDistSender": "kv_transfer.sender",
    "TorchDistReceiver": "kv_transfer.receiver",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kv_transfer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "Handshake",
    "IncompatiblePeer",
    "KVReceiver",
    "KVSender",
    "PeerAddress",
    "PeerLost",
    "ProtocolError",
    "RecvSpec",
    "RecvTransfer",
    "Role",
    "SendSpec",
    "SendTransfer",
    "TorchDistReceiver",
    "TorchDistSender",
    "Transfer",
    "TransferAborted",
    "TransferConfig",
    "TransferError",
    "TransferMetrics",
    "TransferMode",
    "TransferRejected",
    "TransferState",
    "TransferStats",
    "TransferTimeout",
]
