"""Scale-in and redeploy of the decode pool through Ray Serve, with streams in flight.

One local cluster (Ray on 127.0.0.1, the real model, real Redis) driven through
:class:`deploy.up.Up`: one prefill replica and two decode replicas whose drain grace is
short (0.5 s), so the long streams outlive it. The order Serve's stop gives a decode
replica is the worker runtime's drain: refuse new work, health NOT_SERVING, deregister
(the router stops picking it), finish in-flight streams for the grace, then stop; the
router migrates the streams the grace cut (:mod:`router.migration`).

1. Scale-in: short and long greedy streams run on both decode replicas; the decode
   deployment goes to ``num_replicas: 1``. Every stream finishes with exactly the text of
   an uninterrupted run, and at least one long stream on the removed worker ended well
   after the worker was gone — it was migrated.
2. Redeploy: a new version of the decode deployment (its actor options change, so Serve
   replaces the replica: new one first, ``max_surge_percent: 100``) with the streams in
   flight on the old replica when it drains: every stream still ends with the
   uninterrupted run's text (those the grace cuts, if any, move to the new replica: how
   many depends on how long the new replica takes to start), new requests go to the new
   one.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from deploy.local_ray import pin_to_loopback

pin_to_loopback()  # before anything in this process imports ray

from common.launch import free_loopback_port, wait_until  # noqa: E402
from common.registry import SyncRegistryReader  # noqa: E402
from deploy.serve_config import ServeConfig  # noqa: E402
from deploy.up import Up, UpOptions  # noqa: E402
from router.client import StreamResult  # noqa: E402
from tests.integration.deploy_helpers import (  # noqa: E402
    deployment,
    generate,
    load_default,
    small_workers,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]
POLL_S = 0.25
GRACE_S = 0.5  # the decode workers' drain grace: the long streams outlive it
SHORT, LONG = 8, 128  # tokens of a short and of a long stream
PROMPTS = [f"Story {i}: the lighthouse keeper counted the ships and" for i in range(6)]
LENGTHS = [SHORT, LONG, SHORT, LONG, LONG, LONG]


@dataclass
class App:
    up: Up
    data: dict[str, Any]
    endpoint: str
    redis_url: str
    namespace: str
    metrics_url: str  # the router's /metrics

    def drained_migrations(self) -> float:
        """The router's count of streams migrated off a draining (or gone) worker."""
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        pattern = r'^pdserve_router_migrations_total\{cause="drained",pool="default"\} (\S+)$'
        match = re.search(pattern, text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def decode_workers(self) -> list[str]:
        reader = SyncRegistryReader(self.redis_url, self.namespace)
        try:
            return sorted(w.worker_id for w in reader.list_workers(role="decode"))
        finally:
            reader.close()

    def running(self) -> dict[str, int]:
        """Decode worker id → streams in its running batch (its last load report)."""
        reader = SyncRegistryReader(self.redis_url, self.namespace)
        try:
            return {w: load.running for w, load in reader.loads().items() if w.startswith("dec")}
        finally:
            reader.close()


@dataclass
class Streams:
    """The prompts as concurrent greedy streams; each outcome and when it ended."""

    endpoint: str
    results: dict[int, StreamResult] = field(default_factory=dict)
    ended_at: dict[int, float] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Streams:
        for i in range(len(PROMPTS)):
            thread = threading.Thread(target=self._one, args=(i,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def join(self, timeout_s: float = 180) -> Streams:
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "streams still running"
        return self

    def _one(self, i: int) -> None:
        try:
            result = generate(self.endpoint, PROMPTS[i], LENGTHS[i], ignore_eos=True)
        except Exception as exc:  # every failure is a test failure
            self.errors[i] = exc
            return
        self.results[i] = result
        self.ended_at[i] = time.monotonic()


@pytest.fixture(scope="module")
def app(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    data = load_default()
    small_workers(data, cpus=0.5, kv_blocks=256)
    namespace = f"scalein-{uuid.uuid4().hex[:8]}"
    (spec,) = data["applications"]
    spec["args"]["namespace"] = namespace
    metrics_port = free_loopback_port()
    spec["args"]["router"]["metrics_port"] = metrics_port
    for name, replicas in (("PrefillWorker", 1), ("DecodeWorker", 2)):
        entry = deployment(data, name)
        entry.pop("autoscaling_config")
        entry["num_replicas"] = replicas
        # fp32: greedy output is then the same whichever worker (re)computes a token
        entry["user_config"]["engine"]["dtype"] = "float32"
    decode = deployment(data, "DecodeWorker")
    decode["user_config"]["drain_grace_s"] = GRACE_S
    decode["graceful_shutdown_timeout_s"] = 20
    path = write_config(data, tmp_path_factory.mktemp("scalein") / "serve.yaml")
    up = Up(UpOptions(config=path, redis_url=redis_url, port=0, http_port=0, num_cpus=2))
    try:
        endpoint = up.start()
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        yield App(up, data, endpoint, redis_url, namespace, metrics_url)
    finally:
        up.stop()


@pytest.fixture(scope="module")
def reference(app: App) -> list[StreamResult]:
    """The uninterrupted run: the same streams, concurrently, on both decode replicas."""
    wait_until(lambda: len(app.decode_workers()) == 2, 60, "two decode workers", poll_s=POLL_S)
    streams = Streams(app.endpoint).start().join()
    assert streams.errors == {}
    return [streams.results[i] for i in range(len(PROMPTS))]


def _assert_uninterrupted(streams: Streams, reference: list[StreamResult]) -> None:
    assert streams.errors == {}, streams.errors
    for i, want in enumerate(reference):
        got = streams.results[i]
        assert got.finish_reason == "length" and len(got.token_ids) == LENGTHS[i]
        assert got.token_ids == want.token_ids and got.text == want.text, PROMPTS[i]
        assert got.usage is not None and got.usage.completion_tokens == LENGTHS[i]


def _apply(app: App, change: Any) -> None:
    config = ServeConfig(app.data)
    change(deployment(config.data, "DecodeWorker"))
    app.data = config.data
    app.up.apply(config)


def test_scale_in_under_load_fails_no_stream(app: App, reference: list[StreamResult]) -> None:
    before = app.decode_workers()
    assert len(before) == 2
    migrated = app.drained_migrations()
    streams = Streams(app.endpoint).start()
    wait_until(
        lambda: all(app.running().get(w, 0) > 0 for w in before),
        60,
        "streams on both decode workers",
        poll_s=POLL_S,
    )
    _apply(app, lambda d: d.update(num_replicas=1))
    wait_until(lambda: len(app.decode_workers()) == 1, 60, "one worker gone", poll_s=POLL_S)
    gone_at = time.monotonic()
    (removed,) = set(before) - set(app.decode_workers())
    streams.join()

    _assert_uninterrupted(streams, reference)
    on_removed = [i for i, r in streams.results.items() if r.route.decode_worker == removed]
    assert on_removed, f"no stream was routed to {removed}"
    # Streams of the removed worker outlived its grace and still completed: the router
    # migrated them off the drained worker, and says so.
    assert app.drained_migrations() > migrated
    assert max(streams.ended_at[i] for i in on_removed) > gone_at
    after = generate(app.endpoint, "And then?", 4, ignore_eos=True)
    assert after.route is not None and after.route.decode_worker != removed


def test_redeploy_with_streams_in_flight_fails_no_stream(
    app: App, reference: list[StreamResult]
) -> None:
    (old,) = app.decode_workers()
    streams = Streams(app.endpoint).start()
    wait_until(lambda: app.running().get(old, 0) >= 4, 60, "streams running", poll_s=POLL_S)
    # A new actor option is a new version of the deployment: Serve replaces the replica.
    _apply(app, lambda d: d.update(ray_actor_options={"num_cpus": 0.45}))
    wait_until(lambda: old not in app.decode_workers(), 120, "old worker gone", poll_s=POLL_S)
    in_flight_at_drain = len(PROMPTS) - len(streams.results) - len(streams.errors)
    streams.join()
    _assert_uninterrupted(streams, reference)
    assert in_flight_at_drain > 0, "the streams ended before the old replica drained"
    assert {r.route.decode_worker for r in streams.results.values()} == {old}
    (new,) = app.decode_workers()
    assert new != old
    after = generate(app.endpoint, "And then?", 4, ignore_eos=True)
    assert after.route is not None and after.route.decode_worker == new
