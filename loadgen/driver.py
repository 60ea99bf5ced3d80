"""The load driver: replays sessions against a target, open or closed loop, bounded.

    load = LoadSpec(mode="open", rate=2.0, seed=0, max_duration_s=120)
    run = await drive(target, sessions, load)          # -> RunRecords

Open loop: sessions start at Poisson arrival times (``rate`` per second, seeded) whatever
the server does. Closed loop: ``concurrency`` clients, each starting its next session as
soon as its previous one ends. Turns within a session run one after another (a multi-turn
chat waits for each reply). Bounds: no session starts after ``max_duration_s``; at
``max_duration_s + drain_s`` whatever is still in flight is cancelled and recorded with
error ``CANCELLED``; turns never sent are counted as ``unsent``. A one-line progress bar
goes to stderr.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from loadgen.record import ChatRequest, RequestRecord
from loadgen.targets import Target
from loadgen.workload import Session


@dataclass(frozen=True, slots=True)
class LoadSpec:
    mode: str = "closed"  # open | closed
    rate: float = 1.0  # open loop: sessions per second
    concurrency: int = 4  # closed loop: clients
    seed: int = 0
    max_duration_s: float = 300.0  # no session starts later than this
    drain_s: float = 120.0  # then in-flight requests get this long
    request_timeout_s: float = 300.0
    ignore_eos: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError(f"mode must be open or closed, got {self.mode!r}")
        if self.mode == "open" and not self.rate > 0:
            raise ValueError("open loop needs a rate > 0")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError("closed loop needs concurrency >= 1")

    def describe(self) -> str:
        if self.mode == "open":
            return f"open loop, Poisson {self.rate:g} sessions/s (seed {self.seed})"
        return f"closed loop, {self.concurrency} concurrent"


@dataclass(slots=True)
class RunRecords:
    records: list[RequestRecord] = field(default_factory=list)
    messages: dict[tuple[str, int], list[dict[str, str]]] = field(default_factory=dict)
    unsent: int = 0  # turns never sent (the time bound, or an earlier turn failed)
    duration_s: float = 0.0  # first send to last end


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """``count`` arrival offsets (seconds) of a Poisson process of ``rate`` per second."""
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(count):
        t += rng.expovariate(rate)
        times.append(t)
    return times


async def drive(target: Target, sessions: Sequence[Session], load: LoadSpec) -> RunRecords:
    run = RunRecords()
    progress = Progress(sum(s.num_requests for s in sessions), enabled=load.progress)
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    async def play(session: Session, due_s: float) -> None:
        replies: list[str] = []
        for turn_index, turn in enumerate(session.turns):
            messages = session.messages(turn_index, replies)
            record = RequestRecord(session.session_id, turn_index, session.group, due_s)
            run.records.append(record)
            run.messages[(session.session_id, turn_index)] = messages
            request = ChatRequest(
                f"{session.session_id}-t{turn_index}", messages, turn.max_tokens, load.ignore_eos
            )
            try:
                await target.send(request, record, clock, load.request_timeout_s)
            except asyncio.CancelledError:
                record.error, record.end_s = "CANCELLED", clock()
                progress.done(ok=False)
                raise
            progress.done(ok=record.ok, refused=record.refused)
            if not record.ok:
                return  # the rest of a conversation needs this reply
            replies.append(record.reply)
            due_s = clock()

    if load.mode == "open":
        tasks = _open_loop(sessions, load, play)
    else:
        tasks = _closed_loop(sessions, load, play, clock)
    waiter = asyncio.gather(*tasks)
    try:
        await asyncio.wait_for(waiter, timeout=load.max_duration_s + load.drain_s)
    except TimeoutError:
        pass  # wait_for cancelled the stragglers; their records say CANCELLED
    finally:
        progress.close()
    run.unsent = sum(s.num_requests for s in sessions) - len(run.records)
    sent = [r for r in run.records if r.sent_s or r.end_s]
    if sent:
        run.duration_s = max(r.end_s for r in sent) - min(r.sent_s for r in sent)
    return run


Play = Callable[[Session, float], Awaitable[None]]  # play(session, due_s)


def _open_loop(sessions: Sequence[Session], load: LoadSpec, play: Play) -> list[asyncio.Future]:
    """One task per session, sleeping until its Poisson arrival time."""
    arrivals = poisson_arrivals(len(sessions), load.rate, load.seed)

    async def at(session: Session, offset_s: float) -> None:
        if offset_s > load.max_duration_s:
            return
        await asyncio.sleep(offset_s)
        await play(session, offset_s)

    return [asyncio.ensure_future(at(s, t)) for s, t in zip(sessions, arrivals, strict=True)]


def _closed_loop(
    sessions: Sequence[Session], load: LoadSpec, play: Play, clock: Callable[[], float]
) -> list[asyncio.Future]:
    """``concurrency`` tasks taking the next session from a shared queue."""
    queue: list[Session] = list(reversed(sessions))

    async def client() -> None:
        while queue:
            session = queue.pop()
            if clock() > load.max_duration_s:
                queue.clear()
                return
            await play(session, clock())

    return [asyncio.ensure_future(client()) for _ in range(load.concurrency)]


class Progress:
    """``[#####.....] 12/48 ok 10 failed 1 refused 1  9.8s`` on one stderr line (a TTY redraws it;
    otherwise a line every 10%)."""

    def __init__(self, total: int, enabled: bool = True, out: TextIO = sys.stderr) -> None:
        self.total = max(total, 1)
        self.ok = self.failed = self.refused = 0
        self.enabled = enabled
        self._out = out
        self._tty = out.isatty()
        self._start = time.monotonic()
        self._last_decile = -1

    def done(self, ok: bool, refused: bool = False) -> None:
        if ok:
            self.ok += 1
        elif refused:
            self.refused += 1
        else:
            self.failed += 1
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        finished = self.ok + self.failed + self.refused
        decile = finished * 10 // self.total
        if not self._tty and decile == self._last_decile:
            return
        self._last_decile = decile
        filled = min(20, finished * 20 // self.total)
        line = (
            f"[{'#' * filled}{'.' * (20 - filled)}] {finished}/{self.total} "
            f"ok {self.ok} failed {self.failed} refused {self.refused} "
            f"{time.monotonic() - self._start:6.1f}s"
        )
        self._out.write(("\r" + line) if self._tty else line + "\n")
        self._out.flush()

    def close(self) -> None:
        if self.enabled and self._tty:
            self._out.write("\n")
            self._out.flush()
