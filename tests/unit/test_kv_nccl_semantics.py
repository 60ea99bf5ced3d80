"""NCCL's completion semantics, on CPU: ``wait()`` returns at once without completing, and
only ``is_completed()`` tells the truth. The link must time out, abort and tear down on a
host deadline with such works exactly as it does with gloo's blocking ones."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kv_transfer.completion import Completion, WaitBudget, poll_work
from kv_transfer.errors import TransferTimeout
from kv_transfer.torch_dist import FrameOps, Link


class NcclLikeWork:
    """A work with NCCL's host semantics: ``wait()`` never blocks and completes nothing;
    ``is_completed()`` flips ``delay_s`` after creation, or never (``delay_s`` None)."""

    def __init__(self, delay_s: float | None) -> None:
        self._done_at = None if delay_s is None else time.monotonic() + delay_s
        self.waits = 0

    def is_completed(self) -> bool:
        return self._done_at is not None and time.monotonic() >= self._done_at

    def wait(self, timeout=None) -> bool:
        self.waits += 1
        return True  # like NCCL: "fine" on the host, whether or not the op finished


class FakeNcclGroup:
    """Posts NcclLikeWork; records aborts (what ``Link.close`` must call on NCCL)."""

    def __init__(self, delay_s: float | None) -> None:
        self.delay_s = delay_s
        self.aborted = 0

    def send(self, tensors, dst, tag):
        return NcclLikeWork(self.delay_s)

    def recv(self, tensors, src, tag):
        return NcclLikeWork(self.delay_s)

    def abort(self) -> None:
        self.aborted += 1


def _link(group: FakeNcclGroup, max_wait_s: float = 30.0) -> Link:
    budget = WaitBudget(max_wait_s=max_wait_s, max_sleep_s=0.002, idle_sleep_s=0.005)
    return Link(group, 0, 1, "peer", completion=Completion.POLLED, budget=budget)  # type: ignore[arg-type]


def test_wait_observes_completion_not_wait() -> None:
    group = FakeNcclGroup(delay_s=0.05)
    link = _link(group)
    work = link.irecv(torch.zeros(4), 0)
    start = time.monotonic()
    link.wait(work, 5.0, "DATA")
    took = time.monotonic() - start
    assert 0.045 <= took < 1.0  # returned once is_completed flipped, not at wait()
    assert work.is_completed() and group.aborted == 0


def test_never_completing_work_times_out_and_aborts_the_group() -> None:
    group = FakeNcclGroup(delay_s=None)
    link = _link(group)
    work = link.isend(torch.zeros(4), 0)
    start = time.monotonic()
    with pytest.raises(TransferTimeout, match="timed out"):
        link.wait(work, 0.1, "DATA")
    assert time.monotonic() - start < 0.5
    assert group.aborted == 1 and link.group is None  # torn down; the pair re-joins later


def test_no_wait_outlives_the_group_budget() -> None:
    group = FakeNcclGroup(delay_s=None)
    link = _link(group, max_wait_s=0.1)  # the group's timeout, less its margin
    start = time.monotonic()
    with pytest.raises(TransferTimeout):
        link.wait(link.irecv(torch.zeros(4), 0), 3600.0, "waiting for BEGIN")
    assert time.monotonic() - start < 0.5


def test_idle_poll_stops_on_eviction_without_hanging_the_thread() -> None:
    group = FakeNcclGroup(delay_s=None)
    link = _link(group)
    evicted = threading.Event()
    work = link.irecv(torch.zeros(4), 0)
    result: list[bool] = []
    thread = threading.Thread(
        target=lambda: result.append(
            link.poll(work, 3600.0, "waiting for BEGIN", idle=True, stop=evicted.is_set)
        )
    )
    thread.start()
    time.sleep(0.05)
    evicted.set()
    thread.join(timeout=1.0)
    assert not thread.is_alive() and result == [False]
    link.expire()
    assert group.aborted == 1


def test_frame_ops_abandon_ends_lease_with_pending_nccl_works() -> None:
    group = FakeNcclGroup(delay_s=None)
    link = _link(group)

    class Lease:
        returned = 0

        def return_lease(self) -> None:
            Lease.returned += 1

    ops = FrameOps(Lease())  # type: ignore[arg-type]
    ops.works += [link.isend(torch.zeros(4), 0) for _ in range(3)]
    start = time.monotonic()
    with pytest.raises(TransferTimeout):
        ops.finish(link, 0.05, "DATA")
    assert time.monotonic() - start < 0.5
    assert Lease.returned == 1 and group.aborted == 1  # the lease ends after the abort


def test_poll_work_backs_off_and_respects_the_deadline() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    class Never:
        def is_completed(self) -> bool:
            return False

    assert not poll_work(Never(), 0.01, 0.004, clock=lambda: now[0], sleep=sleep)
    assert sleeps[:3] == pytest.approx([20e-6, 40e-6, 80e-6])
    assert max(sleeps) <= 0.004 and now[0] == pytest.approx(0.01)


def test_wait_budget_stays_below_the_group_timeout() -> None:
    assert WaitBudget.for_group(600.0).max_wait_s == pytest.approx(540.0)
    assert WaitBudget.for_group(5.0).max_wait_s == pytest.approx(4.0)
    assert WaitBudget.for_group(600.0).deadline(1e9, 0.0) == pytest.approx(540.0)
