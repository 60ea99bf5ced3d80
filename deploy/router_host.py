"""The public gRPC router living inside a Serve replica (one per node).

Same object as ``python -m router`` serves — :class:`router.server.RouterServer` — run on
a :class:`~deploy.hosting.LoopThread`. Lifecycle::

    start     thread: RouterServer.start() (tokenizers, Redis registry view + KV event
              follower, gRPC server on host:port with health + reflection)
    ready     wait_ready(): started and its gRPC health says SERVING
    serve     check_health() for Serve's health checks; address / http_address (None
              without HTTP) for `pdserve up`
    stop      stop(): RouterServer.stop(grace) — health NOT_SERVING, in-flight streams
              finish within the grace, then the server and its background tasks stop
"""

from __future__ import annotations

import asyncio
import logging

from deploy.hosting import LoopThread, grpc_health
from router.config import RouterConfig

log = logging.getLogger(__name__)


class RouterHost:
    def __init__(self, config: RouterConfig, drain_grace_s: float = 10.0) -> None:
        self.config = config
        self.drain_grace_s = drain_grace_s
        self.address: str | None = None
        self.http_address: str | None = None
        self._thread = LoopThread("router")
        self._stop = asyncio.Event()  # bound to the router's loop on first use

    def start(self) -> None:
        self._thread.start(self._main)

    async def wait_ready(self, timeout_s: float = 120.0) -> str:
        async with asyncio.timeout(timeout_s):
            while self.address is None:
                self._raise_if_dead()
                await asyncio.sleep(0.05)
        await self.check_health()
        log.info("router serving gRPC on %s, HTTP on %s", self.address, self.http_address)
        return self.address

    async def check_health(self) -> None:
        self._raise_if_dead()
        if self.address is None:
            raise RuntimeError("router: not started")
        if self.config.tls_cert_file is not None:
            return  # a TLS probe could need a client certificate: the live thread suffices
        status = await asyncio.to_thread(grpc_health, self.address, 5.0)
        if status != "SERVING":
            raise RuntimeError(f"router {self.address}: gRPC health {status}")

    async def stop(self) -> None:
        self._thread.call_soon(self._stop.set)
        if not await self._thread.wait(self.drain_grace_s + 10.0):
            log.warning("router: still stopping at the end of the grace period")

    async def _main(self) -> None:
        from router.server import RouterServer  # tokenizers: on this thread, not Serve's

        server = RouterServer(self.config)
        try:
            await server.start()
            self.http_address = server.http_address
            self.address = server.address
            await self._stop.wait()
        finally:
            log.info("router stopping")
            await server.stop(grace_s=self.drain_grace_s)

    def _raise_if_dead(self) -> None:
        error = self._thread.error
        if error is not None:
            raise RuntimeError(f"router failed: {error!r}") from error
        if not self._thread.running:
            raise RuntimeError("router has stopped")
