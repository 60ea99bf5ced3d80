"""Autoscaling and redeploys on a live local cluster (Ray on 127.0.0.1, real model).

One cluster for the module, driven in-process through :class:`deploy.up.Up` (the code
behind `pdserve up`), with deploy/serve.yaml shrunk to fit 2 cores: CPU fractions, small
KV caches, and quick autoscaling for the prefill pool (decode is fixed at 1 replica so
only the pool under test moves).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from deploy.local_ray import pin_to_loopback

pin_to_loopback()  # before anything in this process imports ray

from common.launch import wait_until  # noqa: E402
from common.registry import SyncRegistryReader  # noqa: E402
from deploy.serve_config import ServeConfig  # noqa: E402
from deploy.up import Up, UpOptions  # noqa: E402
from tests.integration.deploy_helpers import (  # noqa: E402
    Load,
    deployment,
    generate,
    load_default,
    long_prompt,
    small_workers,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
POLL_S = 0.5  # Serve's status and the registry are asked at most twice a second


@dataclass
class Cluster:
    up: Up
    data: dict[str, Any]  # the deployed serve.yaml document
    endpoint: str
    redis_url: str
    namespace: str

    def replicas(self, name: str) -> tuple[int, int]:
        """(running, target) replicas of a deployment, from Serve."""
        from ray import serve

        status = serve.status().applications["pdserve"].deployments[name]
        running = sum(n for s, n in status.replica_states.items() if _name(s) == "RUNNING")
        details = serve.context._get_global_client().get_serve_details()
        target = details["applications"]["pdserve"]["deployments"][name]["target_num_replicas"]
        return running, int(target)

    def workers(self, role: str) -> list[str]:
        reader = SyncRegistryReader(self.redis_url, self.namespace)
        try:
            return [w.worker_id for w in reader.list_workers(role=role)]
        finally:
            reader.close()


def _name(value: Any) -> str:
    return str(getattr(value, "value", value))


@pytest.fixture(scope="module")
def cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    data = load_default()
    small_workers(data, cpus=0.5, kv_blocks=256)
    namespace = f"deploytest-{uuid.uuid4().hex[:8]}"
    (app,) = data["applications"]
    app["args"]["namespace"] = namespace
    app["args"]["latency_window_s"] = 3
    decode = deployment(data, "DecodeWorker")
    decode.pop("autoscaling_config")
    decode["num_replicas"] = 1
    decode["user_config"]["engine"]["num_kv_blocks"] = 640
    prefill = deployment(data, "PrefillWorker")
    prefill["autoscaling_config"].update(
        metrics_interval_s=0.5,
        look_back_period_s=2,
        upscale_delay_s=1,
        downscale_delay_s=5,
        policy={
            "policy_function": "deploy.autoscaling:prefill_policy",
            "policy_kwargs": {"ttft_p90_ms": 4000, "queued_tokens_per_replica": 1200},
        },
    )
    path = write_config(data, tmp_path_factory.mktemp("deploy") / "serve.yaml")
    up = Up(UpOptions(config=path, redis_url=redis_url, port=0, http_port=0, num_cpus=2))
    try:
        endpoint = up.start()
        yield Cluster(up, data, endpoint, redis_url, namespace)
    finally:
        up.stop()


def test_prefill_pool_scales_out_under_a_burst_and_back_in(cluster: Cluster) -> None:
    assert cluster.replicas("PrefillWorker") == (1, 1)
    (first,) = cluster.workers("prefill")
    load = Load(
        cluster.endpoint,
        make_prompt=lambda i: long_prompt(1000 + i, words=220),  # ~640 tokens each
        max_tokens=4,
        concurrency=6,
        max_requests=30,
    ).start()
    try:
        wait_until(
            lambda: cluster.replicas("PrefillWorker")[0] == 2,
            150,
            "a 2nd prefill replica",
            poll_s=POLL_S,
        )
        # The new replica takes a share of the burst once it is registered.
        wait_until(
            lambda: any(r.route and r.route.prefill_worker != first for r in load.results),
            150,
            "a request prefilled by the new replica",
            poll_s=POLL_S,
        )
    finally:
        load.stop()
    assert load.errors == []
    assert len(load.results) == load.issued
    assert all(r.finish_reason == "length" and len(r.token_ids) == 4 for r in load.results)

    wait_until(
        lambda: cluster.replicas("PrefillWorker") == (1, 1), 120, "scale back to 1", poll_s=POLL_S
    )
    wait_until(
        lambda: len(cluster.workers("prefill")) == 1, 30, "one prefill worker left", poll_s=POLL_S
    )


def test_decode_redeploy_drains_the_old_worker_without_failing_streams(cluster: Cluster) -> None:
    (old,) = cluster.workers("decode")
    streams = Load(
        cluster.endpoint,
        make_prompt=lambda i: f"Story number {i}: once upon a time",
        max_tokens=240,
        ignore_eos=True,
        concurrency=4,
        max_requests=4,
    ).start()
    try:
        wait_until(
            lambda: _decoding(cluster, old) == 4,
            60,
            "4 streams on the decode worker",
            poll_s=POLL_S,
        )
        changed = ServeConfig(cluster.data)
        entry = deployment(changed.data, "DecodeWorker")
        entry["user_config"]["engine"]["max_num_seqs"] = 48  # a decode config change
        cluster.up.apply(changed)
        wait_until(
            lambda: old not in cluster.workers("decode"),
            120,
            "old worker deregistered",
            poll_s=POLL_S,
        )
        in_flight_at_drain = streams.issued - len(streams.results) - len(streams.errors)
        (new,) = cluster.workers("decode")
    finally:
        streams.stop()
    assert new != old and new.startswith(old)  # same replica, next worker generation
    assert streams.errors == []
    assert [len(r.token_ids) for r in streams.results] == [240] * 4
    assert {r.route.decode_worker for r in streams.results if r.route} == {old}
    assert in_flight_at_drain > 0, "the streams ended before the drain began"

    after = generate(cluster.endpoint, "And then?", 8, ignore_eos=True)
    assert after.route is not None and after.route.decode_worker == new
    # serve.status() can show the replica UPDATING for a moment after reconfigure() returned
    wait_until(
        lambda: cluster.replicas("DecodeWorker") == (1, 1), 60, "one running replica", poll_s=POLL_S
    )


def _decoding(cluster: Cluster, worker_id: str) -> int:
    reader = SyncRegistryReader(cluster.redis_url, cluster.namespace)
    try:
        load = reader.loads().get(worker_id)
    finally:
        reader.close()
    return load.running if load is not None else 0
