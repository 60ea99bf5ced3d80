"""Helpers for the Ray deployment tests: test configs, prompts, load, process trees.

The test configs are deploy/serve.yaml with small overrides (a smaller KV cache, CPU
fractions so extra replicas fit on 2 cores, quick autoscaling), so the shipped file is
what the tests exercise.
"""

from __future__ import annotations

import copy
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from deploy.serve_config import DEFAULT_CONFIG
from router.client import StreamResult, build_request, collect, stream_generate

_WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by",
    "at", "from", "his", "her", "an", "are", "be", "which", "or", "had", "not", "this",
    "river", "stone", "cloud", "paper", "engine", "garden", "window", "silver", "market",
)  # fmt: skip


def load_default() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def deployment(data: dict[str, Any], name: str) -> dict[str, Any]:
    (app,) = data["applications"]
    for entry in app["deployments"]:
        if entry["name"] == name:
            return entry
    raise KeyError(name)


def small_workers(data: dict[str, Any], cpus: float = 0.5, kv_blocks: int = 256) -> None:
    """Fit the 2-core test box: CPU fractions, small KV caches, long prefill deadlines."""
    for name in ("PrefillWorker", "DecodeWorker"):
        entry = deployment(data, name)
        entry["ray_actor_options"] = {"num_cpus": cpus}
        entry["placement_group_bundles"] = [{"CPU": cpus}]
        worker = entry["user_config"]
        worker["engine"]["num_kv_blocks"] = kv_blocks
        worker["drain_grace_s"] = 60  # a slow shared box: streams may need a while
        # Queueing behind a burst of long prompts must not look like a failed prefill.
        worker["prefill_timeout_s"] = 180
        worker["kv_transfer"] = {"timeout_s": 180}
        entry["graceful_shutdown_timeout_s"] = 75


def write_config(data: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def with_changes(data: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    copied = copy.deepcopy(data)
    change(copied)
    return copied


def long_prompt(seed: int, words: int = 250) -> str:
    """Distinct text (no shared prefix between seeds) of about 2.9 tokens per word."""
    rng = random.Random(seed)
    return f"[{seed}] " + " ".join(
        f"{rng.choice(_WORDS)}{rng.randint(0, 99)}" for _ in range(words)
    )


def generate(
    address: str,
    prompt: str,
    max_tokens: int,
    *,
    chat: bool = False,
    ignore_eos: bool = False,
    timeout_s: float = 300,
) -> StreamResult:
    request = build_request(prompt, chat=chat, max_tokens=max_tokens, ignore_eos=ignore_eos)
    return collect(stream_generate(address, request, timeout_s))


@dataclass
class Load:
    """Keeps ``concurrency`` requests in flight until stopped; records every outcome."""

    address: str
    make_prompt: Callable[[int], str]
    max_tokens: int
    concurrency: int
    max_requests: int
    ignore_eos: bool = False
    results: list[StreamResult] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _issued: int = 0
    _futures: list[Future[None]] = field(default_factory=list)
    _pool: ThreadPoolExecutor | None = None

    def start(self) -> Load:
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="load")
        self._futures = [self._pool.submit(self._loop) for _ in range(self.concurrency)]
        return self

    def stop(self, timeout_s: float = 300) -> None:
        """No new requests; wait for the ones in flight."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for f in self._futures:
            f.result(timeout=max(0.1, deadline - time.monotonic()))
        assert self._pool is not None
        self._pool.shutdown()

    @property
    def issued(self) -> int:
        return self._issued

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._issued >= self.max_requests:
                    return
                seed = self._issued
                self._issued += 1
            try:
                result = generate(
                    self.address,
                    self.make_prompt(seed),
                    self.max_tokens,
                    ignore_eos=self.ignore_eos,
                )
            except (grpc.RpcError, Exception) as exc:  # every failure is a test failure
                with self._lock:
                    self.errors.append(exc)
                continue
            with self._lock:
                self.results.append(result)


# ---- processes ---------------------------------------------------------------------------------


def process_tree(root: int) -> dict[int, str]:
    """pid → start time (field 22 of /proc/pid/stat) of ``root`` and every descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _ppid(int(entry))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry))
    tree: dict[int, str] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        start = _start_time(pid)
        if start is not None:
            tree[pid] = start
            stack.extend(children.get(pid, []))
    return tree


def survivors(tree: dict[int, str]) -> list[str]:
    """The processes of ``tree`` that still run (same pid *and* start time), described."""
    alive = []
    for pid, start in tree.items():
        if _start_time(pid) == start and _state(pid) not in ("Z", None):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            alive.append(f"{pid}: {cmdline[:120]}")
    return alive


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its closing ")".
    return stat[stat.rindex(")") + 2 :].split()


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def _state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields else None
