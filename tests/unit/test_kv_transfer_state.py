"""The Transfer state machine, its release contract, specs, handshake and metrics."""

from __future__ import annotations

import threading
import time

import pytest

from kv_transfer.errors import PeerLost, TransferAborted, TransferTimeout
from kv_transfer.metrics import DURATION_BUCKETS, TransferStats
from kv_transfer.transfer import RecvTransfer, SendTransfer, Transfer
from kv_transfer.types import (
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
    assert t.poll() is TransferState.PENDING
    assert t._start() and t.state is TransferState.TRANSFERRING
    t._progress(1000, 2)
    t._progress(1000, 4)
    assert t._succeed()
    assert not t._succeed() and not t.abort() and not t._fail(PeerLost("late"))
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
    assert not t._start()
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
        t._start()
        time.sleep(0.001)
        barrier = threading.Barrier(4)
        actions = [
            t._succeed,
            t.abort,
            lambda t=t: t._expire(time.monotonic()),
            lambda t=t: t._fail(PeerLost("x")),
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
    t._start()
    with t._touching_blocks() as live:
        assert live
    t.abort()
    with t._touching_blocks() as live:
        assert not live


def test_abort_waits_for_an_in_progress_block_access() -> None:
    """release must never run while the transport is still writing the blocks."""
    order: list[str] = []
    t = _recv(lambda _: order.append("release"))
    t._start()
    entered = threading.Event()

    def landing() -> None:
        with t._touching_blocks() as live:
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
    t._start()
    assert t._lease() and t._lease()
    assert t._fail(PeerLost("gone"))  # a transport thread: never blocks
    assert t.state is TransferState.FAILED and calls == []
    assert not t._lease()  # no new lease once terminal
    assert t.wait(0.01) is TransferState.FAILED and calls == []  # wait() waits for release
    t._unlease()
    assert calls == []
    t._unlease()
    assert calls == [t] and t.wait(0) is TransferState.FAILED


def test_abort_returns_only_after_the_leases_are_back() -> None:
    order: list[str] = []
    t = _recv(lambda _: order.append("release"))
    t._start()
    assert t._lease()

    def wire() -> None:
        time.sleep(0.05)
        order.append("pieces landed")
        t._unlease()

    th = threading.Thread(target=wire)
    th.start()
    assert t.abort()
    order.append("abort returned")
    th.join()
    assert order == ["pieces landed", "release", "abort returned"]
    # already terminal: abort() is a no-op, but still only returns after release
    t2 = _recv(lambda _: order.append("release 2"))
    t2._start()
    t2._lease()
    t2._expire(time.monotonic() + 3600)  # the deadline monitor ended it
    threading.Timer(0.03, t2._unlease).start()
    assert not t2.abort()
    assert order[-1] == "release 2"


def test_abort_from_inside_release_does_not_deadlock() -> None:
    t = _recv(lambda tr: tr.abort())
    t._start()
    t._lease()
    t._succeed()
    done = threading.Event()
    threading.Thread(target=lambda: (t._unlease(), done.set())).start()
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
    assert not t._expire(time.monotonic() - 1)
    assert t._expire(time.monotonic() + 1)
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
    assert t.ready_layers == 0 and not t._wait_layers(1, 0.01)
    t.mark_layer_ready(0)
    with pytest.raises(ValueError, match="expected layer 1"):
        t.mark_layer_ready(2)
    assert t._wait_layers(1, 0)
    threading.Timer(0.02, t.abort).start()
    start = time.monotonic()
    assert not t._wait_layers(3, 5)
    assert time.monotonic() - start < 2
    whole = SendTransfer("w", (0,), 3, 30.0, lambda _: None, mode=TransferMode.WHOLE)
    assert whole._wait_layers(3, 0)


def test_failures_counted_by_kind() -> None:
    stats = TransferStats()
    _recv(lambda _: None, stats=stats).abort()
    _recv(lambda _: None, stats=stats)._fail(PeerLost("x"))
    snap = stats.snapshot()
    assert snap.transfers == {("receiver", "aborted"): 1, ("receiver", "peer_lost"): 1}
    assert stats.failures() == 2 and snap.bytes == {}


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


def test_handshake_mismatches_name_each_field() -> None:
    a = Handshake("smol", "float32", 16, 30, 3, 64)
    assert a.mismatches(a) == []
    b = Handshake("smol", "bfloat16", 32, 30, 3, 64)
    problems = a.mismatches(b, "receiver", "sender")
    assert problems == [
        "dtype: receiver 'float32', sender 'bfloat16'",
        "block_size: receiver 16, sender 32",
    ]
    assert Handshake.from_json(a.to_json()) == a
