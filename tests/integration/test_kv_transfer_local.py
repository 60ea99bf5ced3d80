"""The torch.distributed transport's protocol edge cases, with real gloo pairs on loopback
between endpoints of this one process (threads) — fast, and able to speak raw frames.
The cross-process behaviour (kills, restarts) is in ``test_kv_transfer.py``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from engine.kv_cache import ORDERS, KVCache, KVLayout
from kv_transfer.errors import ProtocolError, TransferAborted, TransferRejected, TransferTimeout
from kv_transfer.packing import Staging, layer_block_bytes
from kv_transfer.receiver import TorchDistReceiver
from kv_transfer.rendezvous import connect_store, new_pair_group, request_join
from kv_transfer.segments import plan_frames
from kv_transfer.sender import TorchDistSender
from kv_transfer.torch_dist import Link
from kv_transfer.transfer import SendTransfer, Transfer
from kv_transfer.types import (
    RecvSpec,
    SendSpec,
    TransferConfig,
    TransferMode,
    TransferState,
)
from kv_transfer.wire import (
    HEADER_BYTES,
    MODE_CODES,
    TAG_CTRL,
    TAG_DATA,
    Header,
    Kind,
    transfer_key,
    write_runs,
)

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
LAYOUT = KVLayout(num_layers=6, num_kv_heads=2, head_dim=16, block_size=4, num_blocks=40)
CONFIG = TransferConfig(timeout_s=10.0, grace_s=1.0, chunk_bytes=8192, poll_interval_s=0.01)
# Generous waits: a process that has created many TCPStores (one per receiver here) now
# and then stalls 5 s in a store client's connect (torch, seen on 2.13), i.e. in a join.
SETTLE = 20.0
pytestmark = pytest.mark.timeout(90)


class Ledger:
    """Counts blocks held by live transfers; release must bring it back to zero."""

    def __init__(self) -> None:
        self.held = 0
        self.lock = threading.Lock()

    def take(self, ids: tuple[int, ...]) -> tuple[int, ...]:
        with self.lock:
            self.held += len(ids)
        return ids

    def release(self, transfer: Transfer) -> None:
        with self.lock:
            self.held -= len(transfer.block_ids)


@pytest.fixture
def receiver() -> Iterator[TorchDistReceiver]:
    r = TorchDistReceiver(KVCache(LAYOUT), "m", CONFIG)
    yield r
    r.close()


@pytest.fixture
def sender() -> Iterator[TorchDistSender]:
    cache = KVCache(LAYOUT)
    cache.tensor.normal_()
    s = TorchDistSender(cache, "m", CONFIG)
    yield s
    s.close()


def _pair(
    sender,
    receiver,
    ledger: Ledger,
    tid: str,
    src,
    dst,
    mode=TransferMode.WHOLE,
    timeout_s: float | None = None,
):
    rt = receiver.expect(RecvSpec(tid, ledger.take(tuple(dst)), timeout_s), ledger.release)
    st = sender.send(
        SendSpec(tid, receiver.address, ledger.take(tuple(src)), mode, timeout_s), ledger.release
    )
    return st, rt


def _mark_all_ready(st: SendTransfer) -> None:
    """What a layer-wise prefill does as it computes its layers, all at once."""
    for layer in range(st.ready_layers, st.num_layers):
        st.mark_layer_ready(layer)


def _landed(sender, receiver, st, rt) -> bool:
    return torch.equal(
        sender.cache.gather(torch.tensor(st.block_ids)),
        receiver.cache.gather(torch.tensor(rt.block_ids)),
    )


def test_many_pairs_in_one_process_concurrently(receiver: TorchDistReceiver) -> None:
    ledger = Ledger()
    senders = []
    for seed in range(3):
        cache = KVCache(LAYOUT)
        cache.tensor.normal_(generator=torch.Generator().manual_seed(seed))
        senders.append(TorchDistSender(cache, "m", CONFIG))
    try:
        started = [
            (
                s,
                *_pair(
                    s,
                    receiver,
                    ledger,
                    f"c{i}",
                    range(4 * i, 4 * i + 4),
                    range(39 - 4 * i, 35 - 4 * i, -1),
                    TransferMode.LAYERWISE,
                ),
            )
            for i, s in enumerate(senders)
        ]
        for _, st, _ in started:
            _mark_all_ready(st)
        for s, st, rt in started:
            assert st.wait(SETTLE) is TransferState.DONE and rt.wait(SETTLE) is TransferState.DONE
            assert _landed(s, receiver, st, rt)
        assert receiver.num_pairs() == 3 and ledger.held == 0
        snap = receiver.stats.snapshot()
        assert snap.transfers[("receiver", "done")] == 3
        assert snap.bytes["receiver"] == 12 * LAYOUT.bytes_per_block
    finally:
        for s in senders:
            s.close()


def test_block_count_mismatch_fails_both(sender, receiver) -> None:
    ledger = Ledger()
    rt = receiver.expect(RecvSpec("m", ledger.take((1, 2, 3))), ledger.release)
    st = sender.send(SendSpec("m", receiver.address, ledger.take((4, 5))), ledger.release)
    assert st.wait(SETTLE) is TransferState.FAILED and rt.wait(SETTLE) is TransferState.FAILED
    assert isinstance(st.error, TransferRejected) and "block_count" in str(st.error)
    assert "2 blocks, 3 were reserved" in str(rt.error)
    assert ledger.held == 0


def test_cancel_of_a_queued_transfer_reaches_the_receiver(sender, receiver) -> None:
    ledger = Ledger()
    st1, rt1 = _pair(sender, receiver, ledger, "first", [0, 1], [2, 3], TransferMode.LAYERWISE)
    st2, rt2 = _pair(sender, receiver, ledger, "queued", [4, 5], [6, 7])
    assert st2.abort("prefill failed")  # still queued behind the stalled layer-wise one
    _mark_all_ready(st1)
    assert rt2.wait(SETTLE) is TransferState.FAILED
    assert isinstance(rt2.error, TransferAborted) and rt2.error.by_peer
    assert st1.wait(SETTLE) is TransferState.DONE and rt1.wait(SETTLE) is TransferState.DONE
    assert ledger.held == 0


def test_layerwise_stall_times_out_on_both_sides_and_pair_survives(sender, receiver) -> None:
    ledger = Ledger()
    st, rt = _pair(
        sender,
        receiver,
        ledger,
        "stall",
        [0, 1, 2],
        [3, 4, 5],
        TransferMode.LAYERWISE,
        timeout_s=0.5,
    )
    st.mark_layer_ready(0)
    assert st.wait(SETTLE) is TransferState.FAILED and rt.wait(SETTLE) is TransferState.FAILED
    assert isinstance(st.error, TransferTimeout) and isinstance(rt.error, TransferTimeout)
    assert rt.layers_landed == 1 and ledger.held == 0
    st, rt = _pair(sender, receiver, ledger, "next", [0, 1, 2], [3, 4, 5])
    assert st.wait(SETTLE) is TransferState.DONE and rt.wait(SETTLE) is TransferState.DONE
    assert receiver.num_pairs() == 1  # aborts travel as frames: no re-join was needed


def test_stale_pair_is_rejoined_transparently() -> None:
    """A receiver drops a pair that stays idle too long; the next send re-joins."""
    idle = TransferConfig(timeout_s=10.0, grace_s=1.0, idle_timeout_s=0.3)
    receiver = TorchDistReceiver(KVCache(LAYOUT), "m", idle)
    cache = KVCache(LAYOUT)
    cache.tensor.normal_()
    sender = TorchDistSender(cache, "m", idle)
    ledger = Ledger()
    try:
        st, rt = _pair(sender, receiver, ledger, "a", [0], [1])
        assert st.wait(SETTLE) is TransferState.DONE
        deadline = time.monotonic() + SETTLE
        while receiver.num_pairs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.num_pairs() == 0  # idle timeout tore it down
        st, rt = _pair(sender, receiver, ledger, "b", [2, 3], [4, 5])
        assert st.wait(SETTLE) is TransferState.DONE and rt.wait(SETTLE) is TransferState.DONE
        assert _landed(sender, receiver, st, rt) and ledger.held == 0
    finally:
        sender.close()
        receiver.close()


def test_receiver_close_fails_pending_and_refuses_new(sender, receiver) -> None:
    ledger = Ledger()
    st, _ = _pair(sender, receiver, ledger, "warm", [0], [1])
    assert st.wait(SETTLE) is TransferState.DONE
    pending = receiver.expect(RecvSpec("pending", ledger.take((2,))), ledger.release)
    receiver.close()
    assert pending.state is TransferState.FAILED
    with pytest.raises(RuntimeError):
        receiver.expect(RecvSpec("late", (3,)), ledger.release)
    st = sender.send(SendSpec("pending", receiver.address, ledger.take((5,))), ledger.release)
    assert st.wait(SETTLE) is TransferState.FAILED and "closing" in str(st.error)
    assert ledger.held == 0


@pytest.mark.parametrize("direct_min", [0, 1 << 30], ids=["direct", "staged"])
def test_misordered_frame_is_detected_not_landed(
    receiver: TorchDistReceiver, direct_min: int
) -> None:
    """A frame of another transfer fails this one and is never landed: its staged payload
    is dropped, and the direct pieces posted ahead could only ever reach this transfer's
    own blocks, which are freed (never decoded). No other block is touched."""
    ledger = Ledger()
    receiver.cache.tensor.fill_(3.0)
    rt = receiver.expect(RecvSpec("victim", ledger.take((10, 11))), ledger.release)
    store = connect_store(receiver.address, 5)
    pair = request_join(store, "evil", receiver.handshake, receiver.address, 5)
    link = Link(
        new_pair_group(store, pair, 1, torch.device("cpu"), "127.0.0.1", 5), 1, pair, "receiver"
    )
    staging = Staging(torch.device("cpu"))
    key = transfer_key("victim")
    reply = link.irecv(staging.rx_control, TAG_CTRL)
    Header(
        Kind.BEGIN,
        key,
        1,
        num_blocks=2,
        code=MODE_CODES[TransferMode.WHOLE],
        value=1 << 20,
        direct=direct_min,
        runs=1,
    ).write(staging.tx_control)
    write_runs(staging.tx_control, ((0, 2),))
    link.wait(link.isend(staging.tx_control, TAG_CTRL), 5, "BEGIN")
    link.wait(reply, 5, "ACCEPT")
    assert Header.read(staging.rx_control).kind is Kind.ACCEPT
    lbb = layer_block_bytes(LAYOUT)
    runs = ((0, 2),) if direct_min == 0 else ()  # what the receiver has, what we'd have listed
    plan = plan_frames(
        2, LAYOUT.num_layers, lbb, TransferMode.WHOLE, 1 << 20, direct_min, runs, runs
    )
    first = plan[0]
    assert bool(first.direct) == (direct_min == 0)
    # The planned first message, but claiming to belong to another transfer.
    frame = staging.frame(0, first.staged_bytes(lbb))
    frame[HEADER_BYTES:].fill_(0)
    Header(
        Kind.DATA,
        transfer_key("someone-else"),
        1,
        0,
        value=first.staged_bytes(lbb),
        direct=len(first.pieces()),
    ).write(frame)
    link.wait(link.isend(frame, TAG_DATA), 5, "DATA")
    for piece in first.pieces():  # posted ahead, into the victim's blocks only
        link.isend(torch.zeros((piece[3] - piece[2], *LAYOUT.block_shape)), TAG_DATA)
    assert rt.wait(SETTLE) is TransferState.FAILED
    assert isinstance(rt.error, ProtocolError) and ledger.held == 0
    others = torch.ones(receiver.cache.layout.num_blocks, dtype=torch.bool)
    others[[10, 11]] = False
    assert bool((receiver.cache.tensor[:, :, others] == 3.0).all())  # nothing else touched
    if direct_min != 0:  # the staged payload is checked before it lands: never landed
        assert bool((receiver.cache.tensor == 3.0).all())
    link.close()


# How a 6-block transfer of LAYOUT travels. LAYOUT's K (or V) of one block in one layer
# is 512 bytes, so direct_min_bytes=1024 sends segments of >= 2 blocks in place.
PLANS = {
    "staged": ({}, range(6), range(10, 16)),  # default threshold: every block staged
    "direct": ({"direct_min_bytes": 0}, range(6), range(10, 16)),  # one segment, in place
    # segments [0, 3) [3, 4) [4, 6); 2-block frames: direct, staged, direct, per layer
    "mixed": (
        {"direct_min_bytes": 1024, "chunk_bytes": 2048},
        (0, 1, 2, 7, 8, 9),
        (10, 11, 12, 13, 30, 31),
    ),
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", list(TransferMode))
@pytest.mark.parametrize("plan", ["direct", "mixed"])
@pytest.mark.parametrize("inference", [False, True], ids=["plain", "inference-tensors"])
def test_direct_pieces_land_bit_exact_and_nowhere_else(
    mode: TransferMode, plan: str, inference: bool, order: str
) -> None:
    """``inference``: the caches are inference tensors, as an engine made under
    ``torch.inference_mode()`` has; the transport threads send and land into them.
    Page-first caches send whole pages in whole mode and stage everything layer-wise."""
    extra, src, dst = PLANS[plan]
    layout = dataclasses.replace(LAYOUT, order=order)
    with torch.inference_mode(inference):
        receiver_cache, cache = KVCache(layout), KVCache(layout)
        receiver_cache.tensor.fill_(3.0)
        cache.tensor.normal_()
    assert receiver_cache.tensor.is_inference() is inference
    receiver = TorchDistReceiver(receiver_cache, "m", CONFIG)
    sender = TorchDistSender(cache, "m", dataclasses.replace(CONFIG, **extra))
    ledger = Ledger()
    try:
        for i in range(2):  # the second one reuses the pair and its buffers
            st, rt = _pair(sender, receiver, ledger, f"t{i}", src, dst, mode)
            _mark_all_ready(st)
            assert st.wait(SETTLE) is TransferState.DONE and rt.wait(SETTLE) is TransferState.DONE
            assert _landed(sender, receiver, st, rt) and rt.layers_landed == LAYOUT.num_layers
        others = [b for b in range(LAYOUT.num_blocks) if b not in dst]
        assert bool((receiver.cache.gather(torch.tensor(others)) == 3.0).all())
        assert ledger.held == 0
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize(("send_depth", "recv_depth"), [(2, 5), (5, 2), (3, 3)])
@pytest.mark.parametrize("aborter", ["sender", "receiver"])
def test_abort_keeps_pairs_in_step_whatever_the_depths(
    send_depth: int, recv_depth: int, aborter: str, plan: str
) -> None:
    """ABORT plus fillers must match exactly the receives the receiver has posted."""
    extra, src, dst = PLANS[plan]
    receiver = TorchDistReceiver(
        KVCache(LAYOUT), "m", TransferConfig(pipeline_depth=recv_depth, poll_interval_s=0.01)
    )
    cache = KVCache(LAYOUT)
    cache.tensor.normal_()
    sender = TorchDistSender(cache, "m", TransferConfig(pipeline_depth=send_depth, **extra))
    ledger = Ledger()
    try:
        st, rt = _pair(sender, receiver, ledger, "x", src, dst, TransferMode.LAYERWISE)
        st.mark_layer_ready(0)
        st.mark_layer_ready(1)
        deadline = time.monotonic() + SETTLE
        while rt.layers_landed < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert rt.layers_landed == 2
        (st if aborter == "sender" else rt).abort("test")
        assert st.wait(SETTLE) is TransferState.FAILED and rt.wait(SETTLE) is TransferState.FAILED
        for i in range(3):  # the same pair carries the next transfers, bit-exact
            st, rt = _pair(sender, receiver, ledger, f"next{i}", src, range(20, 26))
            assert st.wait(SETTLE) is TransferState.DONE and rt.wait(SETTLE) is TransferState.DONE
            assert _landed(sender, receiver, st, rt)
        assert receiver.num_pairs() == 1 and ledger.held == 0
    finally:
        sender.close()
        receiver.close()


# Big enough for direct pieces to be in flight when an abort comes: K or V of 64 blocks
# in one layer is 1 MiB, a layer 2 MiB, and the frames hold one layer each.
WIDE = KVLayout(num_layers=8, num_kv_heads=4, head_dim=64, block_size=16, num_blocks=160)
WIDE_CONFIG = TransferConfig(timeout_s=10.0, grace_s=1.0, chunk_bytes=2 << 20, poll_interval_s=0.01)


@pytest.mark.parametrize("order", ORDERS)
def test_receiver_abort_with_pieces_in_flight_never_writes_after_release(order: str) -> None:
    """abort() returns only once the pieces posted into the blocks have landed: from then
    on the wire never writes them (the rest of the frames drain into scratch)."""
    wide = dataclasses.replace(WIDE, order=order)
    receiver = TorchDistReceiver(KVCache(wide), "m", WIDE_CONFIG)
    cache = KVCache(wide)
    cache.tensor.normal_()
    sender = TorchDistSender(cache, "m", WIDE_CONFIG)
    dst = tuple(range(80, 144))
    ids = torch.tensor(dst)
    outcomes = set()
    try:
        for attempt in range(6):
            rt = receiver.expect(RecvSpec(f"a{attempt}", dst), lambda _: None)
            st = sender.send(
                SendSpec(f"a{attempt}", receiver.address, tuple(range(64))), lambda _: None
            )
            deadline = time.monotonic() + SETTLE
            while rt.started_at is None and time.monotonic() < deadline:
                time.sleep(0.0002)
            time.sleep(0.001 * attempt)  # the pieces of the first frames are on the wire
            rt.abort("decode gave up")  # returns after release ran
            outcomes.add(rt.state)  # DONE if all 16 MiB landed within those few ms
            after_release = receiver.cache.gather(ids)
            time.sleep(0.1)  # whatever was still coming has arrived (into scratch)
            assert torch.equal(receiver.cache.gather(ids), after_release), "written after release"
            assert st.wait(SETTLE) is rt.state
        assert TransferState.FAILED in outcomes
        # and the pair still works, bit-exact
        rt = receiver.expect(RecvSpec("after", dst), lambda _: None)
        st = sender.send(SendSpec("after", receiver.address, tuple(range(64))), lambda _: None)
        assert st.wait(SETTLE) is TransferState.DONE and rt.wait(SETTLE) is TransferState.DONE
        assert _landed(sender, receiver, st, rt)
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("order", ORDERS)
def test_sender_abort_with_pieces_in_flight_never_ships_reused_blocks(order: str) -> None:
    """The source blocks are read in place; release (which frees them for reuse) waits for
    the pieces on the wire, so a receiver that still completes gets the original bytes."""
    wide = dataclasses.replace(WIDE, order=order)
    receiver = TorchDistReceiver(KVCache(wide), "m", WIDE_CONFIG)
    cache = KVCache(wide)
    cache.tensor.normal_()
    sender = TorchDistSender(cache, "m", WIDE_CONFIG)
    src, dst = tuple(range(64)), tuple(range(80, 144))
    original = cache.gather(torch.tensor(src)).clone()

    def reuse(transfer: Transfer) -> None:  # the prefill worker reusing the blocks
        cache.scatter(torch.tensor(src), torch.full_like(original, -9.0))

    try:
        outcomes = set()
        for attempt in range(6):
            cache.scatter(torch.tensor(src), original)
            rt = receiver.expect(RecvSpec(f"s{attempt}", dst), lambda _: None)
            st = sender.send(SendSpec(f"s{attempt}", receiver.address, src), reuse)
            deadline = time.monotonic() + SETTLE
            while st.metrics is None and st.control.bytes_moved < (attempt + 1) * (2 << 20):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.0002)
            st.abort("prefill request ended")  # returns after release ran
            assert bool((cache.gather(torch.tensor(src)) == -9.0).all())
            state = rt.wait(SETTLE)
            outcomes.add(state)
            if state is TransferState.DONE:  # it all got across before the abort
                assert torch.equal(receiver.cache.gather(torch.tensor(dst)), original)
        assert TransferState.FAILED in outcomes
    finally:
        sender.close()
        receiver.close()


def _wait_until(predicate, timeout_s: float = SETTLE) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_sender_budget_evicts_the_lru_idle_group() -> None:
    """A sender capped at one group alternates between two receivers: each new pair evicts
    the idle one (LRU), every transfer lands, and the metrics count it all."""
    capped = dataclasses.replace(CONFIG, max_pair_groups=1)
    receivers = [TorchDistReceiver(KVCache(LAYOUT), "m", CONFIG) for _ in range(2)]
    cache = KVCache(LAYOUT)
    cache.tensor.normal_()
    sender = TorchDistSender(cache, "m", capped)
    ledger = Ledger()
    try:
        for i in range(4):
            r = receivers[i % 2]
            st, rt = _pair(sender, r, ledger, f"b{i}", [i], [10 + i])
            assert st.wait(SETTLE) is TransferState.DONE and rt.wait(SETTLE) is TransferState.DONE
            assert _landed(sender, r, st, rt)
            assert len(sender.budget) <= 1 and sender.peers() == (str(r.address),)
        snap = sender.budget.stats.snapshot()
        assert snap.setups == 4 and snap.teardowns.get("evicted") == 3 and snap.open == 1
        assert _wait_until(lambda: receivers[0].num_pairs() == 0)  # its sender dropped it
        assert ledger.held == 0
    finally:
        sender.close()
        for r in receivers:
            r.close()


def test_receiver_budget_evicts_an_idle_pair_for_a_new_sender() -> None:
    """A receiver capped at one group: a second sender's join evicts the first sender's
    idle pair (flagged in the store, dropped by both sides); both keep working."""
    capped = TorchDistReceiver(KVCache(LAYOUT), "m", dataclasses.replace(CONFIG, max_pair_groups=1))
    senders = []
    for seed in range(2):
        cache = KVCache(LAYOUT)
        cache.tensor.normal_(generator=torch.Generator().manual_seed(seed))
        senders.append(TorchDistSender(cache, "m", CONFIG))
    ledger = Ledger()
    try:
        for i in range(3):
            s = senders[i % 2]
            st, rt = _pair(s, capped, ledger, f"r{i}", [i], [20 + i])
            assert st.wait(SETTLE) is TransferState.DONE and rt.wait(SETTLE) is TransferState.DONE
            assert _landed(s, capped, st, rt)
            assert _wait_until(lambda: capped.num_pairs() == 1)
        snap = capped.budget.stats.snapshot()
        assert snap.teardowns.get("evicted", 0) >= 2 and snap.open == 1
        assert capped.peers() == (senders[0].name,)
        assert ledger.held == 0
    finally:
        for s in senders:
            s.close()
        capped.close()


def test_idle_group_ttl_tears_down_both_sides() -> None:
    ttl = dataclasses.replace(CONFIG, idle_timeout_s=0.3)
    receiver = TorchDistReceiver(KVCache(LAYOUT), "m", ttl)
    cache = KVCache(LAYOUT)
    cache.tensor.normal_()
    sender = TorchDistSender(cache, "m", ttl)
    ledger = Ledger()
    try:
        st, _ = _pair(sender, receiver, ledger, "ttl", [0], [1])
        assert st.wait(SETTLE) is TransferState.DONE
        assert _wait_until(lambda: len(sender.budget) == 0 and receiver.num_pairs() == 0)
        assert sender.budget.stats.snapshot().open == 0
        assert receiver.budget.stats.snapshot().teardowns.keys() <= {"idle", "error"}
    finally:
        sender.close()
        receiver.close()
