"""An :class:`LLMEngine` on its own thread, driven from asyncio servers.

Lifecycle: ``set_layer_hook()`` (optional, before start), ``start()`` spawns the engine
thread. Coroutines submit *commands* (functions
of the engine) with :meth:`AsyncEngine.call`; the thread runs them between steps, in
order, so only that thread ever touches the engine, its block manager or its KV cache.
While requests are unfinished the thread steps the engine and posts each request's
:class:`StepOutput` to that request's asyncio queue. ``stop()`` fails what is left and
joins the thread.

A stream that its consumer abandons (client cancelled, deadline) aborts its request, so
blocks are always freed.

What never changes after construction — the KV layout and geometry, the context length,
the vocabulary, prompt validation — is readable from any thread, so the workers ask this
object, not the engine behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from common.sampling import SamplingParams
from common.worker_info import BlockGeometry
from engine.kv_cache import KVLayout
from engine.llm_engine import LLMEngine, StepLayerHook
from engine.outputs import StepOutput
from engine.speculative import SpeculativeStats

log = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_WAIT_S = 0.05


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's load, refreshed after every step and command."""

    waiting: int
    running: int
    held: int  # finished prefill-only requests whose blocks are still being sent
    free_blocks: int
    used_blocks: int
    cached_blocks: int
    total_blocks: int


class EngineStopped(RuntimeError):
    """The engine thread is gone; nothing more will be computed."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._after_layer: StepLayerHook | None = None
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = threading.Condition()
        self._streams: dict[str, asyncio.Queue[StepOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._geometry = engine.geometry()
        self.stats = self._snapshot()

    # -- immutable facts: any thread -----------------------------------------------------
    @property
    def layout(self) -> KVLayout:
        return self.engine.layout

    @property
    def geometry(self) -> BlockGeometry:
        return self._geometry

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def blocks_for_prompt(self, num_prompt_tokens: int) -> int:
        return self.engine.blocks_for_prompt(num_prompt_tokens)

    def validate_prompt(self, token_ids: list[int]) -> None:
        """ValueError with the reason if the engine would refuse this prompt."""
        self.engine.validate_prompt(token_ids)

    # -- lifecycle ----------------------------------------------------------------------
    def set_layer_hook(self, after_layer: StepLayerHook) -> None:
        """Call ``after_layer(layer, output)`` on the engine thread as each layer's KV of a
        step is in the cache (the prefill worker's KV sends start there). Before start."""
        if self._thread is not None:
            raise RuntimeError("set the layer hook before starting the engine")
        self._after_layer = after_layer

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._fail_streams(EngineStopped("engine stopped"))

    # -- commands -----------------------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between steps; return its result."""
        if self._stopping or self._loop is None:
            raise EngineStopped("engine is not running")
        future: asyncio.Future[T] = self._loop.create_future()
        self._submit(lambda: self._resolve(future, fn))
        return await future

    def submit(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Fire and forget: ``fn(engine)`` runs on the engine thread; errors are logged."""
        self._submit(lambda: self._guarded(fn))

    def abort(self, request_id: str) -> None:
        """Fire and forget, from any thread: cancel a request and free its blocks (a finished
        ``hold_blocks`` request releases them, to the prefix cache)."""
        self.submit(lambda engine: engine.abort(request_id))

    # -- streams ------------------------------------------------------------------------
    def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams, hold_blocks: bool = False
    ) -> AsyncIterator[StepOutput]:
        """Prefill and decode locally; yields one StepOutput per step until finished."""

        def add(engine: LLMEngine) -> StepOutput | None:
            engine.add_request(request_id, prompt, params, hold_blocks=hold_blocks)
            return None

        return self._stream(request_id, add)

    def decode_prefilled(
        self,
        request_id: str,
        prompt: list[int],
        first_token: int,
        block_ids: list[int],
        params: SamplingParams,
    ) -> AsyncIterator[StepOutput]:
        """Decode a request whose prompt KV landed in ``block_ids`` (now owned by it)."""

        def add(engine: LLMEngine) -> StepOutput | None:
            return engine.add_prefilled(request_id, prompt, first_token, block_ids, params)

        return self._stream(request_id, add)

    async def _stream(
        self, request_id: str, add: Callable[[LLMEngine], StepOutput | None]
    ) -> AsyncIterator[StepOutput]:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already streaming")
        queue: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        finished = False
        try:
            immediate = await self.call(add)
            if immediate is not None:
                finished = True
                yield immediate
                return
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine dropped it; nothing to abort
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished and not self._stopping:
                self.abort(request_id)

    # -- the engine thread --------------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    def _resolve(self, future: asyncio.Future[T], fn: Callable[[LLMEngine], T]) -> None:
        try:
            result = fn(self.engine)
        except BaseException as exc:  # handed to the awaiting coroutine
            self._post(lambda error=exc: future.done() or future.set_exception(error))
        else:
            self._post(lambda: future.done() or future.set_result(result))

    def _guarded(self, fn: Callable[[LLMEngine], Any]) -> None:
        try:
            fn(self.engine)
        except Exception:
            log.exception("engine command failed")

    def _post(self, callback: Callable[[], Any]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # event loop closed during shutdown
            self._loop.call_soon_threadsafe(callback)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._commands and not self._stopping and not self._busy():
                    self._wake.wait(_IDLE_WAIT_S)
                if self._stopping:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for command in commands:
                command()
            if self._busy():
                self._step()
            self.stats = self._snapshot()

    def _busy(self) -> bool:
        return self.engine.has_unfinished()

    def _step(self) -> None:
        try:
            outputs = self.engine.step(self._after_layer)
        except Exception as exc:
            # A failed forward pass leaves no trustworthy state for the requests in it.
            log.exception("engine step failed; aborting all running requests")
            self._abort_all(exc)
            return
        for out in outputs:
            queue = self._streams.get(out.request_id)
            if queue is not None:
                self._post(lambda q=queue, o=out: q.put_nowait(o))

    def _abort_all(self, exc: Exception) -> None:
        for request_id in list(self._streams):
            self.engine.abort(request_id)
        self._fail_streams(exc)

    def _fail_streams(self, exc: BaseException) -> None:
        for queue in list(self._streams.values()):
            self._post(lambda q=queue: q.put_nowait(exc))

    def _snapshot(self) -> EngineStats:
        return engine_stats(self.engine)

    def speculative_stats(self) -> SpeculativeStats:
        """Speculative decoding counters (a snapshot of ints; safe off the engine thread)."""
        return self.engine.speculative_stats()

    async def exact_stats(self) -> EngineStats:
        """The load taken on the engine thread between steps (``stats`` may be a step old)."""
        return await self.call(engine_stats)


def engine_stats(engine: LLMEngine) -> EngineStats:
    bm, scheduler = engine.block_manager, engine.scheduler
    return EngineStats(
        waiting=scheduler.num_waiting,
        running=scheduler.num_running,
        held=scheduler.num_held,
        free_blocks=bm.num_free_blocks,
        used_blocks=bm.num_used_blocks,
        cached_blocks=bm.num_cached_blocks,
        total_blocks=bm.num_blocks,
    )
