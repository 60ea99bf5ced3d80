"""A model directory in the cache, made once even when several processes start at once.

    path = convert_once(cache_dir() / "models" / "M", build, name="M")

``build(staging, stages)`` writes the checkpoint into ``staging`` (a fresh directory beside
the target) and reports its steps with ``stages.step("loading the GGUF")``. The first
process to get there takes an exclusive ``fcntl.flock`` on ``.<name>.lock`` next to the
target, builds into the staging directory, writes the ``.converted`` marker and renames the
staging directory to the target in one ``os.rename``; every other process waits on the lock
and then finds the finished directory. A process that dies mid-build leaves only a staging
directory (removed by the next builder) and releases the lock with its file descriptor, so
a half-written target is never seen. Progress goes to stderr, one line per step with the
seconds it took.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

CONVERTED_MARKER = ".converted"


class Stages:
    """Staged progress on a stream: ``[i/n] what … done (s)`` per step, elapsed overall."""

    def __init__(self, title: str, total: int, err: TextIO | None = None) -> None:
        self.title = title
        self.total = total
        self.err = err
        self._index = 0
        self._started = time.perf_counter()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self._index += 1
        began = time.perf_counter()
        self.say(f"[{self._index}/{self.total}] {what} …")
        yield
        took = time.perf_counter() - began
        self.say(f"[{self._index}/{self.total}] {what}: done in {took:.1f} s")

    def say(self, line: str) -> None:
        err = self.err if self.err is not None else sys.stderr
        print(f"{self.title}: {line}", file=err, flush=True)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self._started


Build = Callable[[Path, Stages], None]


def is_converted(target: Path) -> bool:
    return (target / CONVERTED_MARKER).is_file()


def convert_once(
    target: Path, build: Build, *, name: str, steps: int, err: TextIO | None = None
) -> Path:
    """``target`` complete, built by ``build`` under a lock if it is not there yet."""
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    stages = Stages(f"pdserve: preparing {name}", steps, err)
    with _locked(target.parent / f".{target.name}.lock", stages):
        if is_converted(target):  # another process built it while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a builder that died; we hold the lock
        staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
        staging.mkdir()
        try:
            stages.say(f"converting once into {target} ({steps} steps)")
            build(staging, stages)
            (staging / CONVERTED_MARKER).write_text(name + "\n")
            if target.exists():  # an incomplete directory (no marker) from an older layout
                shutil.rmtree(target)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        stages.say(f"ready in {stages.elapsed_s():.1f} s")
    return target


@contextlib.contextmanager
def _locked(path: Path, stages: Stages) -> Iterator[None]:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stages.say("another process is converting it; waiting")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
