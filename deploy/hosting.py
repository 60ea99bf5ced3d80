"""An asyncio event loop on its own thread, for a server that a Serve replica hosts.

Serve runs a replica's methods on its own event loop, in a thread that is not the
process's main thread. The pdserve servers (a worker's :class:`WorkerRuntime`, the
router's :class:`RouterServer`) are written to own their loop: they install signal
handlers, run grpc.aio servers and background tasks. Hosting them on a loop of their own
keeps them exactly as they run in a standalone process, keeps Serve's health checks and
metric calls responsive while they work, and gives one place where the two worlds meet::

    host = LoopThread("prefill-abc")
    host.start(main)                 # runs `await main()` on the new loop's thread
    host.call_soon(runtime.request_stop)    # thread-safe poke
    value = host.run(coro_fn(), timeout_s)  # run a coroutine there, wait for its result
    await host.wait()                # from another loop: until main() has returned
    host.error                       # the exception main() raised, if any

Signals belong to the process (Ray's worker), not to a hosted server: the loop ignores
``add_signal_handler`` (which only works on the main thread anyway) and the replica stops
its server explicitly, from Serve's shutdown hook.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_T = TypeVar("_T")


class SignalFreeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``add_signal_handler`` is a no-op (see the module doc)."""

    def add_signal_handler(self, sig: int, callback: Callable[..., object], *args: Any) -> None:
        return None

    def remove_signal_handler(self, sig: int) -> bool:
        return False


class LoopThread:
    """Runs one ``main`` coroutine on a private loop in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = SignalFreeLoop()
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread: threading.Thread | None = None

    def start(self, main: Callable[[], Coroutine[Any, Any, object]]) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: already started")
        self._thread = threading.Thread(target=self._run, args=(main,), name=self.name)
        self._thread.daemon = True  # a wedged server must not keep the actor alive
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._done.done()

    @property
    def error(self) -> BaseException | None:
        if not self._done.done():
            return None
        return self._done.exception()

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the loop's thread; a no-op once the loop has finished."""
        # RuntimeError: the loop closed between the check and the call.
        with contextlib.suppress(RuntimeError):
            if not self.loop.is_closed():
                self.loop.call_soon_threadsafe(fn)

    def run(self, coro: Coroutine[Any, Any, _T], timeout_s: float | None = None) -> _T:
        """Run ``coro`` on the loop and block until its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    async def wait(self, timeout_s: float | None = None) -> bool:
        """From another loop: True once ``main`` has returned (or raised)."""
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._done)), timeout_s)
        except TimeoutError:
            return False
        except Exception:  # main() raised: it is done; the error is in .error
            pass
        return True

    def join(self, timeout_s: float | None = None) -> bool:
        """From a plain thread: True once ``main`` has returned (or raised)."""
        try:
            self._done.result(timeout_s)
        except concurrent.futures.TimeoutError:
            return False
        except Exception:
            pass
        return True

    def _run(self, main: Callable[[], Coroutine[Any, Any, object]]) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:
            self._done.set_exception(exc)
        else:
            self._done.set_result(None)
        finally:
            try:
                _cancel_leftovers(self.loop)
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def grpc_health(address: str, timeout_s: float) -> str:
    """One blocking ``grpc.health.v1`` check of the server's overall status.

    Returns the status name (``SERVING``, ``NOT_SERVING``, ...) or ``CODE: details`` when
    the call failed. Blocking on purpose: callers run it in a worker thread, so it never
    shares a grpc.aio event loop with the hosted server.
    """
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
