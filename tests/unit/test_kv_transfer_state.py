"""The Transfer state machine, its release contract, specs, handshake and metrics."""

from __future__ import annotations

import threading
import time

import pytest

from common.kv_compat import KVCompat
from common.worker_info import BlockGeometry
from kv_transfer.errors import PeerLost, TransferAborted, TransferTimeout
from kv_transfer.metrics import DURATION_BUCKETS, TransferStats
from kv_transfer.transfer import RecvTransfer, SendTransfer, Transfer
from kv_transfer.types import (
    PROTOCOL_VERSION,
    Handshake,
    PeerAddress,
    RecvSpec,
    Role,
    SendSpec,
    TransferConfig,
    TransferMode,
    TransferState,
)


def _recv(release, timeout_s: float = 30.0, stats: TransferStats | None = None) -> RecvTransfer:
    return RecvTransfer("t", (1, 2, 3), 4, timeout_s, release, stats=stats)


def test_success_path_releases_once_and_records_metrics() -> None:
    calls: list[Transfer] = []
    stats = TransferStats()
    t = _recv(calls.append, stats=stats)
    assert t.state is TransferState.PENDING
    assert t.control.start() and t.state is TransferState.TRANSFERRING
    t.control.add_progress(1000, 2)
    t.control.add_progress(1000, 4)
    assert t.control.succeed()
    assert not t.control.succeed() and not t.abort() and not t.control.fail(PeerLost("late"))
    assert calls == [t]
    assert t.wait(0) is TransferState.DONE and t.error is None
    m = t.metrics
    assert m is not None and m.bytes == 2000 and m.layers == 4 and m.role is Role.RECEIVER
    snap = stats.snapshot()
    assert snap.transfers == {("receiver", "done"): 1}
    assert snap.bytes == {"receiver": 2000}
    assert snap.duration_count == {"receiver": 1}
    assert len(snap.duration_counts["receiver"]) == len(DURATION_BUCKETS)


def test_abort_before_start_fails_and_start_is_refused() -> None:
    calls: list[Transfer] = []
    t = _recv(calls.append)
    assert t.abort("client went away")
    assert not t.control.start()
    assert t.state is TransferState.FAILED
    assert isinstance(t.error, TransferAborted) and "client went away" in str(t.error)
    assert calls == [t]


def test_release_runs_exactly_once_under_racing_terminal_transitions() -> None:
    for _ in range(50):
        calls: list[Transfer] = []
        lock = threading.Lock()

        def release(t: Transfer, calls=calls, lock=lock) -> None:
            with lock:
                calls.append(t)

        t = _recv(release, timeout_s=0.0001)
        t.control.start()
        time.sleep(0.001)
        barrier = threading.Barrier(4)
        actions = [
            t.control.succeed,
            t.abort,
            lambda t=t: t.control.expire(time.monotonic()),
            lambda t=t: t.control.fail(PeerLost("x")),
        ]

        def run(action, barrier=barrier) -> None:
            barrier.wait()
            action()

        threads = [threading.Thread(target=run, args=(a,)) for a in actions]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert len(calls) == 1 and t.state.terminal


def test_no_block_access_after_terminal() -> None:
    t = _recv(lambda _: None)
    t.control.start()
    with t.control.touching_blocks() as live:
        assert live
    t.abort()
    with t.control.touching_blocks() as live:
        assert not live


def test_abort_waits_for_an_in_progress_block_access() -> None:
    """release must never run while the transport is still writing the blocks."""
    order: list[str] = []
    t = _recv(lambda _: order.append("release"))
    t.control.start()
    entered = threading.Event()

    def landing() -> None:
        with t.control.touching_blocks() as live:
            assert live
            entered.set()
            time.sleep(0.05)
            order.append("landed")

    th = threading.Thread(target=landing)
    th.start()
    entered.wait(1)
    t.abort()
    th.join()
    assert order == ["landed", "release"]


def test_release_waits_for_the_leases_out_and_runs_once() -> None:
    """Direct pieces read / write the blocks in place: release only after they are through."""
    calls: list[Transfer] = []
    t = _recv(calls.append)
    t.control.start()
    assert t.control.lease() and t.control.lease()
    assert t.control.fail(PeerLost("gone"))  # a transport thread: never blocks
    assert t.state is TransferState.FAILED and calls == []
    assert not t.control.lease()  # no new lease once terminal
    assert t.wait(0.01) is TransferState.FAILED and calls == []  # wait() waits for release
    t.control.return_lease()
    assert calls == []
    t.control.return_lease()
    assert calls == [t] and t.wait(0) is TransferState.FAILED


def test_abort_returns_only_after_the_leases_are_back() -> None:
    order: list[str] = []
    t = _recv(lambda _: order.append("release"))
    t.control.start()
    assert t.control.lease()

    def wire() -> None:
        time.sleep(0.05)
        order.append("pieces landed")
        t.control.return_lease()

    th = threading.Thread(target=wire)
    th.start()
    assert t.abort()
    order.append("abort returned")
    th.join()
    assert order == ["pieces landed", "release", "abort returned"]
    # already terminal: abort() is a no-op, but still only returns after release
    t2 = _recv(lambda _: order.append("release 2"))
    t2.control.start()
    t2.control.lease()
    t2.control.expire(time.monotonic() + 3600)  # the deadline monitor ended it
    threading.Timer(0.03, t2.control.return_lease).start()
    assert not t2.abort()
    assert order[-1] == "release 2"


def test_abort_from_inside_release_does_not_deadlock() -> None:
    t = _recv(lambda tr: tr.abort())
    t.control.start()
    t.control.lease()
    t.control.succeed()
    done = threading.Event()
    threading.Thread(target=lambda: (t.control.return_lease(), done.set())).start()
    assert done.wait(2)


def test_wait_returns_after_release_and_times_out_while_live() -> None:
    released = threading.Event()
    t = _recv(lambda _: released.set())
    assert t.wait(0.01) is TransferState.PENDING
    threading.Timer(0.02, t.abort).start()
    assert t.wait(5) is TransferState.FAILED
    assert released.is_set()


def test_deadline_expiry() -> None:
    t = _recv(lambda _: None, timeout_s=0.01)
    assert not t.control.expire(time.monotonic() - 1)
    assert t.control.expire(time.monotonic() + 1)
    assert isinstance(t.error, TransferTimeout)


def test_buggy_release_does_not_break_the_transition() -> None:
    def boom(_: Transfer) -> None:
        raise RuntimeError("caller bug")

    t = _recv(boom)
    assert t.abort()
    assert t.wait(0) is TransferState.FAILED


def test_release_must_be_callable() -> None:
    with pytest.raises(TypeError, match="release"):
        _recv(None)  # type: ignore[arg-type]


def test_layer_readiness_in_order_and_wakes_on_abort() -> None:
    t = SendTransfer("s", (0,), 3, 30.0, lambda _: None, mode=TransferMode.LAYERWISE)
    assert t.ready_layers == 0 and not t.control.wait_for_layers(1, 0.01)
    t.mark_layer_ready(0)
    with pytest.raises(ValueError, match="expected layer 1"):
        t.mark_layer_ready(2)
    assert t.control.wait_for_layers(1, 0)
    threading.Timer(0.02, t.abort).start()
    start = time.monotonic()
    assert not t.control.wait_for_layers(3, 5)
    assert time.monotonic() - start < 2
    whole = SendTransfer("w", (0,), 3, 30.0, lambda _: None, mode=TransferMode.WHOLE)
    assert whole.control.wait_for_layers(3, 0)


def test_failures_counted_by_kind() -> None:
    stats = TransferStats()
    _recv(lambda _: None, stats=stats).abort()
    _recv(lambda _: None, stats=stats).control.fail(PeerLost("x"))
    snap = stats.snapshot()
    assert snap.transfers == {("receiver", "aborted"): 1, ("receiver", "peer_lost"): 1}
    assert snap.bytes == {}


def test_specs_validate() -> None:
    peer = PeerAddress.parse("127.0.0.1:5000")
    assert peer == PeerAddress("127.0.0.1", 5000) and str(peer) == "127.0.0.1:5000"
    with pytest.raises(ValueError):
        PeerAddress.parse("nohost")
    assert SendSpec("t", peer, [1, 2]).block_ids == (1, 2)
    with pytest.raises(ValueError):
        SendSpec("t", peer, ())
    with pytest.raises(ValueError):
        RecvSpec("t", (1, 1))
    with pytest.raises(ValueError):
        RecvSpec("t", (1,), timeout_s=0)
    with pytest.raises(ValueError):
        TransferConfig(chunk_bytes=0)


def test_handshake_mismatch_names_each_field() -> None:
    a = Handshake("smol", "float32", 16, 30, 3, 64)
    assert a.mismatch(a) is None
    b = Handshake("smol", "bfloat16", 32, 30, 3, 64)
    assert a.mismatch(b, "receiver", "sender") == (
        "dtype: receiver 'float32', sender 'bfloat16'; block_size: receiver 16, sender 32"
    )
    nccl = Handshake("smol", "float32", 16, 30, 3, 64, order="page_first", backend="nccl")
    assert a.mismatch(nccl, "receiver", "sender") == (
        "order: receiver 'layer_first', sender 'page_first'; "
        "backend: receiver 'gloo', sender 'nccl'"
    )
    assert Handshake.from_dict(a.to_dict()) == a


def test_handshake_wire_format_is_a_flat_object_and_old_peers_parse() -> None:
    a = Handshake("smol", "float32", 16, 30, 3, 64)
    assert a.to_dict() == {
        "model": "smol",
        "dtype": "float32",
        "block_size": 16,
        "num_layers": 30,
        "num_kv_heads": 3,
        "head_dim": 64,
        "order": "layer_first",
        "backend": "gloo",
        "protocol": PROTOCOL_VERSION,
    }
    old = {k: v for k, v in a.to_dict().items() if k not in ("order", "protocol")}
    assert Handshake.from_dict(old) == a  # pre-page-first peers were layer-first
    with pytest.raises(TypeError):  # another protocol's fields: refused as unreadable
        Handshake.from_dict({**a.to_dict(), "page_bytes": 1})


def test_handshake_and_registry_share_one_compatibility_check() -> None:
    """The registry's BlockGeometry and the transport's Handshake are both a KVCompat."""
    geometry = BlockGeometry("smol", "float32", 16, 30, 3, 64, 128)
    handshake = Handshake("smol", "float32", 16, 30, 3, 64, order="page_first")
    assert isinstance(geometry, KVCompat) and isinstance(handshake, KVCompat)
    assert geometry.mismatch(handshake, "receiver", "sender") == (
        "order: receiver 'layer_first', sender 'page_first'"
    )
