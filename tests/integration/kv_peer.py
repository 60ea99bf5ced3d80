"""A KV transfer endpoint in its own OS process, driven by JSON lines, for the tests.

Run as a module (``python -m tests.integration.kv_peer``) it is the peer: it reads one
JSON command per line on stdin and answers one JSON line on stdout (logs go to stderr).
Imported, :class:`KVPeer` starts and drives such a process with bounded waits, so a broken
transport fails a test instead of hanging.

A process hosts named endpoints (``init``), each a TorchDistSender or TorchDistReceiver
with its own KVCache and BlockManager. Blocks are reserved by the commands and freed only
through the transfers' ``release`` callbacks: ``used`` then tells a test whether anything
leaked. Sender caches hold seeded random KV; receiver caches hold a sentinel value, and a
receiver's ``release`` of a DONE transfer records the SHA-256 of the landed blocks, then
restores the sentinel before freeing them — so ``free_blocks_clean`` can check that
nothing was ever written outside a transfer's destination blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common.launch import ChildProcess, child_env

SENTINEL = 7.0


# --------------------------------------------------------------------------- the process


class _Endpoint:
    def __init__(self, cmd: dict[str, Any]) -> None:
        import torch

        from engine.block_manager import BlockManager
        from engine.kv_cache import KVCache, KVLayout
        from kv_transfer.receiver import TorchDistReceiver
        from kv_transfer.sender import TorchDistSender
        from kv_transfer.types import TransferConfig

        self.role = cmd["role"]
        layout = KVLayout(**cmd["layout"])
        self.cache = KVCache(layout)
        self.blocks = BlockManager(layout.num_blocks, layout.block_size)
        self.lock = threading.Lock()
        self.transfers: dict[str, Any] = {}
        self.digests: dict[str, str] = {}
        config = TransferConfig(**cmd.get("config", {}))
        if self.role == "sender":
            gen = torch.Generator().manual_seed(cmd.get("seed", 0))
            self.cache.tensor.copy_(torch.randn(self.cache.tensor.shape, generator=gen))
            self.endpoint: Any = TorchDistSender(self.cache, cmd["model"], config)
        else:
            self.cache.tensor.fill_(SENTINEL)
            self.endpoint = TorchDistReceiver(self.cache, cmd["model"], config)

    def digest(self, block_ids: tuple[int, ...]) -> str:
        import torch

        data = self.cache.gather(torch.tensor(block_ids)).contiguous()
        return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()

    def reserve(self, n: int, order: str = "scattered") -> tuple[int, ...]:
        with self.lock:
            ids = self.blocks.allocate_blocks(n)
        if order == "runs":
            # As the allocator hands them out (runs), rotated differently on each side so
            # that source and destination ids and run breaks differ: direct pieces where a
            # segment is long enough, staged blocks elsewhere.
            cut = n // 2 if self.role == "sender" else n // 3
            return tuple(ids[cut:] + ids[:cut])
        # Make source and destination ids differ and break every run: reversed here,
        # shuffled there (the fully staged path).
        if self.role == "sender":
            return tuple(reversed(ids))
        random.Random(n).shuffle(ids)
        return tuple(ids)

    def release(self, transfer: Any) -> None:
        from kv_transfer.types import TransferState

        if self.role == "receiver" and transfer.state is TransferState.DONE:
            self.digests[transfer.transfer_id] = self.digest(transfer.block_ids)
        if self.role == "receiver":
            import torch

            ids = torch.tensor(transfer.block_ids)
            self.cache.scatter(ids, torch.full_like(self.cache.gather(ids), SENTINEL))
        with self.lock:
            self.blocks.free_blocks(transfer.block_ids)

    def free_blocks_clean(self) -> bool:
        with self.lock:
            used = set()
            for t in self.transfers.values():
                if not t.state.terminal:
                    used.update(t.block_ids)
        free = [b for b in range(self.cache.layout.num_blocks) if b not in used]
        import torch

        return bool((self.cache.gather(torch.tensor(free)) == SENTINEL).all())


class _Peer:
    def __init__(self) -> None:
        self.endpoints: dict[str, _Endpoint] = {}

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "init":
            ep = self.endpoints[cmd.get("endpoint", "main")] = _Endpoint(cmd)
            address = getattr(ep.endpoint, "address", None)
            return {"address": str(address) if address else None}
        ep = self.endpoints[cmd.get("endpoint", "main")]
        return getattr(self, f"op_{op}")(ep, cmd)

    def op_expect(self, ep: _Endpoint, cmd: dict[str, Any]) -> dict[str, Any]:
        from kv_transfer.types import RecvSpec

        ids = ep.reserve(cmd["blocks"], cmd.get("order", "scattered"))
        t = ep.endpoint.expect(RecvSpec(cmd["tid"], ids, cmd.get("timeout_s")), ep.release)
        ep.transfers[cmd["tid"]] = t
        return {"block_ids": list(ids)}

    def op_send(self, ep: _Endpoint, cmd: dict[str, Any]) -> dict[str, Any]:
        from kv_transfer.types import PeerAddress, SendSpec, TransferMode

        ids = ep.reserve(cmd["blocks"], cmd.get("order", "scattered"))
        digest = ep.digest(ids)
        mode = TransferMode(cmd.get("mode", "whole"))
        spec = SendSpec(
            cmd["tid"], PeerAddress.parse(cmd["address"]), ids, mode, cmd.get("timeout_s")
        )
        t = ep.endpoint.send(spec, ep.release)
        ep.transfers[cmd["tid"]] = t
        if mode is TransferMode.LAYERWISE:
            # A stand-in for the prefill: marks ``layers`` layers, one per ``layer_delay_s``.
            layers = cmd.get("layers", ep.cache.layout.num_layers)
            threading.Thread(
                target=_mark_layers,
                args=(t, layers, cmd.get("layer_delay_s", 0.0)),
                daemon=True,
            ).start()
        return {"block_ids": list(ids), "digest": digest}

    def op_wait(self, ep: _Endpoint, cmd: dict[str, Any]) -> dict[str, Any]:
        t = ep.transfers[cmd["tid"]]
        state = t.wait(cmd.get("timeout", 30))
        err = t.error
        return {
            "state": state.value,
            "kind": err.kind if err else None,
            "error": str(err) if err else None,
            "by_peer": err.by_peer if err else None,
            "layers": t.metrics.layers if t.metrics else None,
            "digest": ep.digests.get(cmd["tid"]),
            "seconds": time.monotonic() - t.created_at,
            "ended_at": t.ended_at,
        }

    def op_state(self, ep: _Endpoint, cmd: dict[str, Any]) -> dict[str, Any]:
        t = ep.transfers[cmd["tid"]]
        return {"state": t.state.value, "layers": t.control.layers_done}

    def op_abort(self, ep: _Endpoint, cmd: dict[str, Any]) -> dict[str, Any]:
        return {"aborted": ep.transfers[cmd["tid"]].abort(cmd.get("reason", "test"))}

    def op_used(self, ep: _Endpoint, cmd: dict[str, Any]) -> dict[str, Any]:
        with ep.lock:
            used = ep.blocks.num_used_blocks
        return {"used": used, "clean": ep.free_blocks_clean() if ep.role == "receiver" else True}

    def op_close(self, ep: _Endpoint, cmd: dict[str, Any]) -> dict[str, Any]:
        ep.endpoint.close()
        return {}


def _mark_layers(transfer: Any, layers: int, delay_s: float) -> None:
    for layer in range(layers):
        if delay_s:
            time.sleep(delay_s)
        if transfer.state.terminal:
            return
        transfer.mark_layer_ready(layer)


def _serve() -> None:
    import torch

    from common.env import apply_offline_defaults

    apply_offline_defaults()
    torch.set_num_threads(1)
    peer = _Peer()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        try:
            reply = {"ok": True, **peer.handle(cmd)}
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    os._exit(0)  # do not wait for pair threads blocked on peers that are gone


# --------------------------------------------------------------------------- the client


class KVPeer:
    """Handle on a peer process (a :class:`common.launch.ChildProcess` running
    ``python -m tests.integration.kv_peer``); every call is bounded by ``timeout`` seconds."""

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name = name
        self._child = ChildProcess(
            [sys.executable, "-m", "tests.integration.kv_peer"],
            log_dir / f"{name}.log",
            child_env(threads=1),
            stdin=True,
        )

    def ready(self, timeout: float = 60) -> KVPeer:
        self._reply(timeout)
        return self

    def call(self, op: str, timeout: float = 60, **kwargs: Any) -> dict[str, Any]:
        self._child.write_line(json.dumps({"op": op, **kwargs}))
        reply = self._reply(timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.name} {op} failed: {reply.get('error')}")
        return reply

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._child.next_line(timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.name} did not answer within {timeout}s") from None
        if line is None:
            raise RuntimeError(f"{self.name} exited (code {self._child.proc.poll()})")
        return json.loads(line)

    def kill(self) -> None:
        self._child.kill()

    def stop(self) -> None:
        """Ask the peer to exit; killed if it does not within 10 s (or already died)."""
        if self._child.alive():
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self._child.write_line(json.dumps({"op": "exit"}))
                self._child.wait_exit(10)
        self._child.kill()

    def log(self) -> str:
        return self._child.log_tail()


if __name__ == "__main__":
    _serve()
