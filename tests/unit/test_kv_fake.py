"""The in-process fake transport: same contract as the real one, no sockets.

Each test reserves blocks from real ``BlockManager``s and frees them only through the
transfers' ``release`` callbacks, then checks that nothing leaked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from engine.block_manager import BlockManager
from engine.kv_cache import KVCache, KVLayout
from kv_transfer.errors import (
    IncompatiblePeer,
    PeerLost,
    TransferAborted,
    TransferRejected,
    TransferTimeout,
)
from kv_transfer.fake import FakeNetwork, FakeReceiver, FakeSender
from kv_transfer.transfer import Transfer
from kv_transfer.types import (
    PeerAddress,
    RecvSpec,
    SendSpec,
    TransferConfig,
    TransferMode,
    TransferState,
)

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, block_size=4, num_blocks=32)
CONFIG = TransferConfig(chunk_bytes=2048, timeout_s=5.0, poll_interval_s=0.005)
pytestmark = pytest.mark.timeout(60)


class Side:
    """A cache plus its allocator; release frees a transfer's blocks (thread-safe)."""

    def __init__(self, seed: int) -> None:
        self.cache = KVCache(LAYOUT)
        torch.manual_seed(seed)
        self.cache.tensor.normal_()
        self.blocks = BlockManager(LAYOUT.num_blocks, LAYOUT.block_size)
        self._lock = threading.Lock()

    def reserve(self, n: int) -> tuple[int, ...]:
        with self._lock:
            return tuple(self.blocks.allocate_blocks(n))

    def release(self, transfer: Transfer) -> None:
        with self._lock:
            self.blocks.free_blocks(transfer.block_ids)

    @property
    def used(self) -> int:
        with self._lock:
            return self.blocks.num_used_blocks


@pytest.fixture
def net() -> FakeNetwork:
    return FakeNetwork()


@pytest.fixture
def pair(net: FakeNetwork) -> Iterator[tuple[Side, FakeSender, Side, FakeReceiver]]:
    prefill, decode = Side(1), Side(2)
    sender = net.sender(prefill.cache, "smol", CONFIG)
    receiver = net.receiver(decode.cache, "smol", CONFIG)
    yield prefill, sender, decode, receiver
    sender.close()
    receiver.close()


def _start(
    pair,
    n: int = 5,
    mode: TransferMode = TransferMode.WHOLE,
    tid: str = "r1",
    timeout_s: float | None = None,
):
    prefill, sender, decode, receiver = pair
    src, dst = prefill.reserve(n), decode.reserve(n)
    rt = receiver.expect(RecvSpec(tid, dst, timeout_s), decode.release)
    st = sender.send(SendSpec(tid, receiver.address, src, mode, timeout_s), prefill.release)
    return st, rt


def _same(prefill: Side, decode: Side, st: Transfer, rt: Transfer) -> bool:
    return torch.equal(
        prefill.cache.gather(torch.tensor(st.block_ids)),
        decode.cache.gather(torch.tensor(rt.block_ids)),
    )


@pytest.mark.parametrize("mode", list(TransferMode))
def test_blocks_arrive_bit_exact_and_are_released(pair, mode: TransferMode) -> None:
    prefill, _, decode, _ = pair
    st, rt = _start(pair, n=6, mode=mode)
    if mode is TransferMode.LAYERWISE:
        for layer in range(LAYOUT.num_layers):
            assert rt.layers_landed <= layer
            st.mark_layer_ready(layer)
    assert st.wait(5) is TransferState.DONE and rt.wait(5) is TransferState.DONE
    assert _same(prefill, decode, st, rt)
    assert rt.layers_landed == LAYOUT.num_layers
    assert prefill.used == 0 and decode.used == 0  # both releases ran
    assert st.metrics is not None and st.metrics.bytes == 6 * LAYOUT.bytes_per_block


def test_transfers_to_one_receiver_run_in_order(pair) -> None:
    prefill, sender, decode, receiver = pair
    finished: list[str] = []
    transfers = []
    for i in range(4):
        src, dst = prefill.reserve(2), decode.reserve(2)
        rt = receiver.expect(RecvSpec(f"r{i}", dst), decode.release)

        def release(t: Transfer) -> None:
            finished.append(t.transfer_id)
            prefill.release(t)

        transfers.append((sender.send(SendSpec(f"r{i}", receiver.address, src), release), rt))
    for st, rt in transfers:
        assert st.wait(5) is TransferState.DONE and rt.wait(5) is TransferState.DONE
    assert finished == ["r0", "r1", "r2", "r3"]


@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_abort_mid_transfer_fails_both_and_frees_both(pair, side: str) -> None:
    prefill, _, decode, _ = pair
    st, rt = _start(pair, mode=TransferMode.LAYERWISE)
    st.mark_layer_ready(0)
    time.sleep(0.05)
    (st if side == "sender" else rt).abort("test")
    assert st.wait(5) is TransferState.FAILED and rt.wait(5) is TransferState.FAILED
    local, remote = (st, rt) if side == "sender" else (rt, st)
    assert isinstance(local.error, TransferAborted) and not local.error.by_peer
    assert isinstance(remote.error, TransferAborted) and remote.error.by_peer
    assert prefill.used == 0 and decode.used == 0


def test_sender_abort_before_start_cancels_the_receiver(pair, net: FakeNetwork) -> None:
    prefill, _, decode, _ = pair
    net.chunk_delay_s = 0.05
    first = _start(pair, tid="slow")
    st, rt = _start(pair, tid="queued")
    st.abort("prefill failed")
    assert rt.wait(5) is TransferState.FAILED and isinstance(rt.error, TransferAborted)
    assert first[1].wait(5) is TransferState.DONE
    assert prefill.used == 0 and decode.used == 0


def test_layerwise_sender_that_stalls_times_out_on_both_sides(pair) -> None:
    prefill, _, decode, _ = pair
    st, rt = _start(pair, mode=TransferMode.LAYERWISE, timeout_s=0.2)
    st.mark_layer_ready(0)
    assert st.wait(5) is TransferState.FAILED and rt.wait(5) is TransferState.FAILED
    assert isinstance(st.error, TransferTimeout) or isinstance(rt.error, TransferTimeout)
    assert prefill.used == 0 and decode.used == 0


def test_receiver_timeout_without_sender(pair) -> None:
    _, _, decode, receiver = pair
    rt = receiver.expect(RecvSpec("lonely", decode.reserve(3), 0.05), decode.release)
    assert rt.wait(5) is TransferState.FAILED and isinstance(rt.error, TransferTimeout)
    assert decode.used == 0


def test_unknown_and_duplicate_transfers(pair) -> None:
    prefill, sender, decode, receiver = pair
    st = sender.send(SendSpec("nobody", receiver.address, prefill.reserve(2)), prefill.release)
    assert st.wait(5) is TransferState.FAILED and isinstance(st.error, TransferRejected)
    dst = decode.reserve(2)
    receiver.expect(RecvSpec("dup", dst), decode.release)
    with pytest.raises(ValueError, match="already expected"):
        receiver.expect(RecvSpec("dup", dst), decode.release)


def test_block_count_mismatch_is_refused_on_both_sides(pair) -> None:
    prefill, sender, decode, receiver = pair
    rt = receiver.expect(RecvSpec("m", decode.reserve(3)), decode.release)
    st = sender.send(SendSpec("m", receiver.address, prefill.reserve(2)), prefill.release)
    assert st.wait(5) is TransferState.FAILED and rt.wait(5) is TransferState.FAILED
    assert "block_count" in str(st.error)
    assert prefill.used == 0 and decode.used == 0


def test_incompatible_peer_is_refused(net: FakeNetwork) -> None:
    prefill, decode = Side(1), Side(2)
    other = KVCache(KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, block_size=8, num_blocks=8))
    sender = net.sender(other, "smol", CONFIG)
    receiver = net.receiver(decode.cache, "smol", CONFIG)
    st = sender.send(SendSpec("x", receiver.address, (0,)), lambda _: None)
    assert st.wait(5) is TransferState.FAILED and isinstance(st.error, IncompatiblePeer)
    assert "block_size: sender 8, receiver 4" in str(st.error)
    sender.close()
    receiver.close()
    del prefill


def test_injected_connection_loss_mid_transfer(pair, net: FakeNetwork) -> None:
    prefill, _, decode, receiver = pair
    net.fail_next(receiver.address, PeerLost("cable cut"), after_chunks=1)
    st, rt = _start(pair, n=8)
    assert st.wait(5) is TransferState.FAILED and rt.wait(5) is TransferState.FAILED
    assert isinstance(st.error, PeerLost) and isinstance(rt.error, PeerLost)
    st2, rt2 = _start(pair, n=8, tid="again")  # the pair carries the next transfer
    assert st2.wait(5) is TransferState.DONE and rt2.wait(5) is TransferState.DONE
    assert prefill.used == 0 and decode.used == 0


def test_unreachable_receiver(pair, net: FakeNetwork) -> None:
    prefill, sender, _, receiver = pair
    net.set_down(receiver.address)
    st = sender.send(SendSpec("x", receiver.address, prefill.reserve(1)), prefill.release)
    assert st.wait(5) is TransferState.FAILED and isinstance(st.error, PeerLost)
    st = sender.send(SendSpec("y", PeerAddress("fake", 999), prefill.reserve(1)), prefill.release)
    assert st.wait(5) is TransferState.FAILED and prefill.used == 0


def test_close_releases_everything(pair) -> None:
    prefill, sender, decode, receiver = pair
    st, rt = _start(pair, mode=TransferMode.LAYERWISE)
    rt2 = receiver.expect(RecvSpec("waiting", decode.reserve(2)), decode.release)
    sender.close()
    receiver.close()
    for t in (st, rt, rt2):
        assert t.wait(5) is TransferState.FAILED
    assert prefill.used == 0 and decode.used == 0
    with pytest.raises(RuntimeError):
        sender.send(SendSpec("z", receiver.address, (0,)), lambda _: None)
