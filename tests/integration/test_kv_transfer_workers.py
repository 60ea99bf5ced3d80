"""Pair groups as real worker processes report them: the prefill worker's heartbeat names
the decode worker it holds a group with (what the router's tie-break reads), and both
workers export the group metrics. Shares the session's worker cluster."""

from __future__ import annotations

import pytest

from common.registry import SyncRegistryReader
from tests.integration.workers_cluster import (
    NAMESPACE,
    Cluster,
    cluster_fixture,  # noqa: F401 - provides the `cluster` fixture
    prompts,
)
from tests.integration.workers_harness import decode, decode_request, greedy, scrape, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_prefill_reports_its_kv_peers_and_group_metrics(cluster: Cluster) -> None:
    prefill = cluster.prefill[0]
    channel = cluster.channel(cluster.decode)
    decode(channel, decode_request("kv-peers", prompts()[1], greedy(2), prefill))
    reader = SyncRegistryReader(cluster.redis_url, NAMESPACE)
    try:

        def peers() -> tuple[str, ...]:
            load = reader.loads().get(prefill.worker_id)
            return load.kv_peers if load is not None else ()

        wait_until(lambda: cluster.decode.kv_address in peers(), 10, "kv_peers in heartbeat")
        decode_load = reader.loads()[cluster.decode.worker_id]
        assert decode_load.kv_peers == ()  # receivers do not report: the router reads senders
    finally:
        reader.close()
    sender_text = scrape(prefill)
    assert 'pdserve_kv_pair_groups_open{role="sender"}' in sender_text
    assert 'pdserve_kv_pair_group_setups_total{role="sender"}' in sender_text
    assert "pdserve_kv_pair_group_setup_seconds_bucket" in sender_text
    receiver_text = scrape(cluster.decode)
    assert 'pdserve_kv_pair_groups_open{role="receiver"}' in receiver_text
