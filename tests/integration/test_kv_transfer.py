"""KV transfer between real OS processes over gloo on loopback.

Peers are ``tests/integration/kv_peer.py`` processes with the default model's KV geometry
(SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, fp32, 16-token blocks). Blocks come
from real BlockManagers and are freed only by the transfers' ``release`` callbacks, so
``used == 0`` after each test means nothing was stranded on either side.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.kv_peer import KVPeer

MODEL = "SmolLM2-135M-Instruct"
GEOMETRY = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "block_size": 16}
BIG = {**GEOMETRY, "num_blocks": 300}  # room for a 4096-token prompt (256 blocks)
SMALL = {**GEOMETRY, "num_blocks": 80}
PAGED = {**BIG, "order": "page_first"}
# Direct pieces from 11 blocks (K or V of a block in a layer is 12 KiB), so that the
# "runs" id order below mixes direct pieces and staged blocks in most transfers.
CONFIG = {
    "timeout_s": 20.0,
    "grace_s": 2.0,
    "connect_timeout_s": 15.0,
    "direct_min_bytes": 128 << 10,
}
STALL = 4  # layer-wise sends that stop after this many layers, to be interrupted

pytestmark = pytest.mark.timeout(120)


@dataclass
class Cluster:
    r1: KVPeer
    r2: KVPeer
    s1: KVPeer
    s2: KVPeer
    addr1: str
    addr2: str
    log_dir: Path


def _receiver(peer: KVPeer, layout: dict[str, Any], **extra: Any) -> str:
    reply = peer.call("init", role="receiver", model=MODEL, layout=layout, config=CONFIG, **extra)
    return reply["address"]


def _sender(peer: KVPeer, layout: dict[str, Any], seed: int, **extra: Any) -> None:
    peer.call("init", role="sender", model=MODEL, layout=layout, config=CONFIG, seed=seed, **extra)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("kv_peers")
    peers = {name: KVPeer(name, log_dir) for name in ("r1", "s1", "s2", "r2")}
    try:
        for peer in peers.values():
            peer.ready()
        addr1 = _receiver(peers["r1"], BIG)
        addr2 = _receiver(peers["r2"], SMALL)
        _sender(peers["s1"], BIG, seed=1)
        _sender(peers["s2"], SMALL, seed=2)
        yield Cluster(peers["r1"], peers["r2"], peers["s1"], peers["s2"], addr1, addr2, log_dir)
    finally:
        for peer in peers.values():
            peer.stop()


def _start(
    sender: KVPeer,
    receiver: KVPeer,
    address: str,
    tid: str,
    blocks: int,
    mode: str = "whole",
    order: str = "scattered",
    **send: Any,
) -> str:
    receiver.call("expect", tid=tid, blocks=blocks, order=order)
    return sender.call(
        "send", tid=tid, address=address, blocks=blocks, mode=mode, order=order, **send
    )["digest"]


def _wait(peer: KVPeer, tid: str, timeout: float = 30) -> dict[str, Any]:
    return peer.call("wait", tid=tid, timeout=timeout, timeout_s=timeout + 10)


def _until_mid_transfer(receiver: KVPeer, tid: str, layers: int = STALL) -> None:
    """Wait until the receiver has landed ``layers`` layers of a stalled layer-wise send."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reply = receiver.call("state", tid=tid)
        assert reply["state"] in ("pending", "transferring"), reply
        if reply["layers"] >= layers:
            return
        time.sleep(0.02)
    raise AssertionError(f"{tid} never got {layers} layers across")


def _assert_no_leaks(*peers: KVPeer) -> None:
    for peer in peers:
        reply = peer.call("used")
        assert reply["used"] == 0, f"{peer.name} still holds {reply['used']} blocks"
        assert reply["clean"], f"{peer.name} wrote outside a transfer's blocks"


def _transfer_ok(
    sender: KVPeer,
    receiver: KVPeer,
    address: str,
    tid: str,
    blocks: int,
    mode: str = "whole",
    order: str = "scattered",
    **send: Any,
) -> None:
    digest = _start(sender, receiver, address, tid, blocks, mode, order, **send)
    sent, landed = _wait(sender, tid), _wait(receiver, tid)
    assert sent["state"] == "done", sent
    assert landed["state"] == "done", landed
    assert landed["digest"] == digest  # bit-exact, in different block ids
    assert landed["layers"] == GEOMETRY["num_layers"]


@pytest.mark.parametrize("order", ["scattered", "runs"])
@pytest.mark.parametrize("mode", ["whole", "layerwise"])
@pytest.mark.parametrize("tokens", [16, 128, 1000, 4096])
def test_kv_lands_bit_exact(cluster: Cluster, tokens: int, mode: str, order: str) -> None:
    """Scattered ids: every block staged; runs: direct pieces straight from cache to cache
    for the segments of 11 blocks or more, staged for the rest."""
    blocks = -(-tokens // GEOMETRY["block_size"])
    tid = f"exact-{tokens}-{mode}-{order}"
    _transfer_ok(cluster.s1, cluster.r1, cluster.addr1, tid, blocks, mode, order)
    _assert_no_leaks(cluster.s1, cluster.r1)


@pytest.fixture(scope="module")
def paged(cluster: Cluster) -> str:
    """Page-first caches: a second receiver in r1 and a second sender in s1 (endpoint
    "paged"); returns the receiver's address."""
    address = _receiver(cluster.r1, PAGED, endpoint="paged")
    _sender(cluster.s1, PAGED, seed=4, endpoint="paged")
    return address


@pytest.mark.parametrize("order", ["scattered", "runs"])
@pytest.mark.parametrize("mode", ["whole", "layerwise"])
@pytest.mark.parametrize("tokens", [16, 1000, 4096])
def test_page_first_kv_lands_bit_exact(
    cluster: Cluster, paged: str, tokens: int, mode: str, order: str
) -> None:
    """Whole mode sends each segment (every layer's K and V of its blocks) as one piece,
    even single scattered blocks; layer-wise mode stages every block."""
    blocks = -(-tokens // GEOMETRY["block_size"])
    tid = f"paged-{tokens}-{mode}-{order}"
    cluster.r1.call("expect", endpoint="paged", tid=tid, blocks=blocks, order=order)
    digest = cluster.s1.call(
        "send", endpoint="paged", tid=tid, address=paged, blocks=blocks, mode=mode, order=order
    )["digest"]
    sent = cluster.s1.call("wait", endpoint="paged", tid=tid, timeout=30, timeout_s=40)
    landed = cluster.r1.call("wait", endpoint="paged", tid=tid, timeout=30, timeout_s=40)
    assert sent["state"] == "done" and landed["state"] == "done", (sent, landed)
    assert landed["digest"] == digest and landed["layers"] == GEOMETRY["num_layers"]
    for peer in (cluster.s1, cluster.r1):
        reply = peer.call("used", endpoint="paged")
        assert reply["used"] == 0 and reply["clean"], reply


def test_cache_order_mismatch_is_refused(cluster: Cluster, paged: str) -> None:
    cluster.r1.call("expect", tid="order-1", blocks=2, timeout_s=3)
    cluster.s1.call("send", endpoint="paged", tid="order-1", address=cluster.addr1, blocks=2)
    reply = cluster.s1.call("wait", endpoint="paged", tid="order-1", timeout=20)
    assert reply["state"] == "failed" and reply["kind"] == "incompatible"
    assert "order: receiver 'layer_first', sender 'page_first'" in reply["error"]
    assert _wait(cluster.r1, "order-1")["kind"] == "timeout"
    assert cluster.s1.call("used", endpoint="paged")["used"] == 0
    _assert_no_leaks(cluster.r1)


def test_two_senders_into_one_receiver(cluster: Cluster) -> None:
    d1 = _start(
        cluster.s1, cluster.r1, cluster.addr1, "fan-in-1", 63, "layerwise", layer_delay_s=0.005
    )
    d2 = _start(cluster.s2, cluster.r1, cluster.addr1, "fan-in-2", 40)
    for sender, tid, digest in ((cluster.s1, "fan-in-1", d1), (cluster.s2, "fan-in-2", d2)):
        assert _wait(sender, tid)["state"] == "done"
        assert _wait(cluster.r1, tid)["digest"] == digest
    _assert_no_leaks(cluster.s1, cluster.s2, cluster.r1)


def test_one_sender_to_two_receivers(cluster: Cluster) -> None:
    d1 = _start(cluster.s1, cluster.r1, cluster.addr1, "fan-out-1", 50, "layerwise")
    d2 = _start(cluster.s1, cluster.r2, cluster.addr2, "fan-out-2", 30)
    for receiver, tid, digest in ((cluster.r1, "fan-out-1", d1), (cluster.r2, "fan-out-2", d2)):
        assert _wait(cluster.s1, tid)["state"] == "done"
        assert _wait(receiver, tid)["digest"] == digest
    _assert_no_leaks(cluster.s1, cluster.r1, cluster.r2)


def test_transfers_on_one_pair_stay_ordered(cluster: Cluster) -> None:
    tids = [f"order-{i}" for i in range(5)]
    for i, tid in enumerate(tids):
        _start(cluster.s2, cluster.r2, cluster.addr2, tid, 3 + i)
    ended = []
    for tid in tids:
        assert _wait(cluster.s2, tid)["state"] == "done"
        landed = _wait(cluster.r2, tid)
        assert landed["state"] == "done"
        ended.append(landed["ended_at"])
    assert ended == sorted(ended)  # landed in submission order
    _assert_no_leaks(cluster.s2, cluster.r2)


@pytest.mark.parametrize("order", ["scattered", "runs"])
@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_abort_mid_transfer_frees_both_sides(cluster: Cluster, side: str, order: str) -> None:
    tid = f"abort-{side}-{order}"
    _start(cluster.s1, cluster.r1, cluster.addr1, tid, 64, "layerwise", order, layers=STALL)
    _until_mid_transfer(cluster.r1, tid)  # the first layers landed, the rest never come
    aborter, other = (cluster.s1, cluster.r1) if side == "sender" else (cluster.r1, cluster.s1)
    started = time.monotonic()
    assert aborter.call("abort", tid=tid)["aborted"]
    mine, theirs = _wait(aborter, tid, 5), _wait(other, tid, 5)
    assert time.monotonic() - started < 3
    assert mine["state"] == theirs["state"] == "failed"
    assert mine["kind"] == "aborted" and not mine["by_peer"]
    assert theirs["kind"] == "aborted" and theirs["by_peer"], theirs
    _assert_no_leaks(cluster.s1, cluster.r1)
    _transfer_ok(cluster.s1, cluster.r1, cluster.addr1, f"after-{tid}", 8)  # pair still works


def test_incompatible_peer_is_refused(cluster: Cluster) -> None:
    _sender(cluster.s2, {**SMALL, "block_size": 32}, seed=3, endpoint="bad")
    cluster.r1.call("expect", tid="bad-1", blocks=2, timeout_s=3)
    cluster.s2.call("send", endpoint="bad", tid="bad-1", address=cluster.addr1, blocks=2)
    reply = cluster.s2.call("wait", endpoint="bad", tid="bad-1", timeout=20)
    assert reply["state"] == "failed" and reply["kind"] == "incompatible"
    assert "block_size: receiver 16, sender 32" in reply["error"]
    assert _wait(cluster.r1, "bad-1")["kind"] == "timeout"  # nobody else will send it
    assert cluster.s2.call("used", endpoint="bad")["used"] == 0
    _assert_no_leaks(cluster.r1)


def test_unknown_transfer_is_rejected_and_pending_one_times_out(cluster: Cluster) -> None:
    cluster.s2.call("send", tid="nobody-expects", address=cluster.addr2, blocks=2)
    reply = _wait(cluster.s2, "nobody-expects")
    assert reply["state"] == "failed" and reply["kind"] == "rejected"
    assert "unknown_transfer" in reply["error"]
    cluster.r2.call("expect", tid="never-sent", blocks=3, timeout_s=0.5)
    reply = _wait(cluster.r2, "never-sent")
    assert reply["kind"] == "timeout" and reply["seconds"] < 2
    _assert_no_leaks(cluster.s2, cluster.r2)


@pytest.mark.parametrize("order", ["scattered", "runs"])
def test_killed_sender_fails_the_receiver_and_a_restarted_one_works(
    cluster: Cluster, order: str
) -> None:
    doomed = KVPeer(f"doomed-sender-{order}", cluster.log_dir).ready()
    tid = f"killed-sender-{order}"
    try:
        _sender(doomed, SMALL, seed=5)
        _start(doomed, cluster.r1, cluster.addr1, tid, 60, "layerwise", order, layers=STALL)
        _until_mid_transfer(cluster.r1, tid)
        doomed.kill()
        reply = _wait(cluster.r1, tid)
        assert reply["state"] == "failed" and reply["kind"] == "peer_lost", reply
        assert reply["seconds"] < CONFIG["timeout_s"]
        _assert_no_leaks(cluster.r1)
    finally:
        doomed.stop()
    restarted = KVPeer(f"restarted-sender-{order}", cluster.log_dir).ready()
    try:
        _sender(restarted, SMALL, seed=6)
        _transfer_ok(restarted, cluster.r1, cluster.addr1, f"restarted-{order}", 40, "layerwise")
        _assert_no_leaks(restarted, cluster.r1)
    finally:
        restarted.stop()


@pytest.mark.parametrize("order", ["scattered", "runs"])
def test_killed_receiver_fails_the_sender_cleanly(cluster: Cluster, order: str) -> None:
    doomed = KVPeer(f"doomed-receiver-{order}", cluster.log_dir).ready()
    tid = f"killed-receiver-{order}"
    try:
        address = _receiver(doomed, SMALL)
        _start(cluster.s1, doomed, address, tid, 60, "layerwise", order, layers=STALL)
        _until_mid_transfer(doomed, tid)
        doomed.kill()
        started = time.monotonic()
        reply = _wait(cluster.s1, tid)
        assert reply["state"] == "failed" and reply["kind"] == "peer_lost", reply
        assert time.monotonic() - started < CONFIG["timeout_s"]
        _assert_no_leaks(cluster.s1)
    finally:
        doomed.stop()
    _transfer_ok(cluster.s1, cluster.r1, cluster.addr1, f"after-dead-receiver-{order}", 10)
