"""The torch.distributed transport's protocol edge cases, with real gloo pairs on loopback
between endpoints of this one process (threads) — fast, and able to speak raw frames.
The cross-process behaviour (kills, restarts) is in ``test_kv_transfer.py``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from engine.kv_cache import KVCache, KVLayout
from kv_transfer.errors import ProtocolError, TransferAborted, TransferRejected, TransferTimeout
from kv_transfer.packing import Staging
from kv_transfer.receiver import TorchDistReceiver
from kv_transfer.rendezvous import connect_store, new_pair_group, request_join
from kv_transfer.sender import TorchDistSender
from kv_transfer.torch_dist import Link
from kv_transfer.transfer import Transfer
from kv_transfer.types import (
    RecvSpec,
    SendSpec,
    TransferConfig,
    TransferMode,
    TransferState,
)
from kv_transfer.wire import MODE_CODES, TAG_CTRL, TAG_DATA, Header, Kind, transfer_key

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
LAYOUT = KVLayout(num_layers=6, num_kv_heads=2, head_dim=16, block_size=4, num_blocks=40)
CONFIG = TransferConfig(timeout_s=10.0, grace_s=1.0, chunk_bytes=8192, poll_interval_s=0.01)
pytestmark = pytest.mark.timeout(60)


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
            st.mark_all_ready()
        for s, st, rt in started:
            assert st.wait(10) is TransferState.DONE and rt.wait(10) is TransferState.DONE
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
    assert st.wait(10) is TransferState.FAILED and rt.wait(10) is TransferState.FAILED
    assert isinstance(st.error, TransferRejected) and "block_count" in str(st.error)
    assert "2 blocks, 3 were reserved" in str(rt.error)
    assert ledger.held == 0


def test_cancel_of_a_queued_transfer_reaches_the_receiver(sender, receiver) -> None:
    ledger = Ledger()
    st1, rt1 = _pair(sender, receiver, ledger, "first", [0, 1], [2, 3], TransferMode.LAYERWISE)
    st2, rt2 = _pair(sender, receiver, ledger, "queued", [4, 5], [6, 7])
    assert st2.abort("prefill failed")  # still queued behind the stalled layer-wise one
    st1.mark_all_ready()
    assert rt2.wait(5) is TransferState.FAILED
    assert isinstance(rt2.error, TransferAborted) and rt2.error.by_peer
    assert st1.wait(5) is TransferState.DONE and rt1.wait(5) is TransferState.DONE
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
    assert st.wait(5) is TransferState.FAILED and rt.wait(5) is TransferState.FAILED
    assert isinstance(st.error, TransferTimeout) and isinstance(rt.error, TransferTimeout)
    assert rt.layers_landed == 1 and ledger.held == 0
    st, rt = _pair(sender, receiver, ledger, "next", [0, 1, 2], [3, 4, 5])
    assert st.wait(5) is TransferState.DONE and rt.wait(5) is TransferState.DONE
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
        assert st.wait(5) is TransferState.DONE
        deadline = time.monotonic() + 5
        while receiver.num_pairs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.num_pairs() == 0  # idle timeout tore it down
        st, rt = _pair(sender, receiver, ledger, "b", [2, 3], [4, 5])
        assert st.wait(10) is TransferState.DONE and rt.wait(10) is TransferState.DONE
        assert _landed(sender, receiver, st, rt) and ledger.held == 0
    finally:
        sender.close()
        receiver.close()


def test_receiver_close_fails_pending_and_refuses_new(sender, receiver) -> None:
    ledger = Ledger()
    st, _ = _pair(sender, receiver, ledger, "warm", [0], [1])
    assert st.wait(5) is TransferState.DONE
    pending = receiver.expect(RecvSpec("pending", ledger.take((2,))), ledger.release)
    receiver.close()
    assert pending.state is TransferState.FAILED
    with pytest.raises(RuntimeError):
        receiver.expect(RecvSpec("late", (3,)), ledger.release)
    st = sender.send(SendSpec("pending", receiver.address, ledger.take((5,))), ledger.release)
    assert st.wait(5) is TransferState.FAILED and "closing" in str(st.error)
    assert ledger.held == 0


def test_misordered_frame_is_detected_not_landed(receiver: TorchDistReceiver) -> None:
    """A frame of another transfer never lands in this transfer's blocks."""
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
        Kind.BEGIN, key, 1, num_blocks=2, code=MODE_CODES[TransferMode.WHOLE], value=1 << 20
    ).write(staging.tx_control)
    link.wait(link.isend(staging.tx_control, TAG_CTRL), 5, "BEGIN")
    link.wait(reply, 5, "ACCEPT")
    assert Header.read(staging.rx_control).kind is Kind.ACCEPT
    # One frame of the planned size, but claiming to belong to another transfer.
    frame = staging.frame(0, 2 * LAYOUT.bytes_per_block)
    frame[64:].fill_(0)
    Header(Kind.DATA, transfer_key("someone-else"), 1, 0, value=2 * LAYOUT.bytes_per_block).write(
        frame
    )
    link.wait(link.isend(frame, TAG_DATA), 5, "DATA")
    assert rt.wait(5) is TransferState.FAILED
    assert isinstance(rt.error, ProtocolError) and ledger.held == 0
    assert bool((receiver.cache.tensor == 3.0).all())  # nothing landed
    link.close()


@pytest.mark.parametrize(("send_depth", "recv_depth"), [(2, 5), (5, 2), (3, 3)])
@pytest.mark.parametrize("aborter", ["sender", "receiver"])
def test_abort_keeps_pairs_in_step_whatever_the_depths(
    send_depth: int, recv_depth: int, aborter: str
) -> None:
    """ABORT plus fillers must match exactly the receives the receiver has posted."""
    receiver = TorchDistReceiver(
        KVCache(LAYOUT), "m", TransferConfig(pipeline_depth=recv_depth, poll_interval_s=0.01)
    )
    cache = KVCache(LAYOUT)
    cache.tensor.normal_()
    sender = TorchDistSender(cache, "m", TransferConfig(pipeline_depth=send_depth))
    ledger = Ledger()
    try:
        st, rt = _pair(
            sender, receiver, ledger, "x", range(6), range(10, 16), TransferMode.LAYERWISE
        )
        st.mark_layer_ready(0)
        st.mark_layer_ready(1)
        deadline = time.monotonic() + 5
        while rt.layers_landed < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        (st if aborter == "sender" else rt).abort("test")
        assert st.wait(5) is TransferState.FAILED and rt.wait(5) is TransferState.FAILED
        for i in range(3):  # the same pair carries the next transfers, bit-exact
            st, rt = _pair(sender, receiver, ledger, f"next{i}", range(6), range(20, 26))
            assert st.wait(5) is TransferState.DONE and rt.wait(5) is TransferState.DONE
            assert _landed(sender, receiver, st, rt)
        assert receiver.num_pairs() == 1 and ledger.held == 0
    finally:
        sender.close()
        receiver.close()
