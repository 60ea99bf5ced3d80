"""In-process fake of the Prefill call, for tests of the decode lifecycle.

:class:`FakePrefillClient` hands the :class:`~messages.prefill.PrefillJob` to a function
of the same process — in the tests, a prefill app's ``Prefiller.run`` — instead of a
prefill worker's gRPC server, and turns its :class:`~common.errors.RequestError` into
:class:`~decode_worker.prefill_client.PrefillFailed` as the gRPC client turns a status
code into one. Fault injection: ``gate`` holds every call until it is set, ``failure``
makes every call fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from common.errors import RequestError
from decode_worker.prefill_client import PrefillFailed
from messages.prefill import PrefillJob, PrefillResult

PrefillFn = Callable[[PrefillJob], Awaitable[PrefillResult]]


class FakePrefillClient:
    def __init__(self, run: PrefillFn) -> None:
        self._run = run
        self.gate: asyncio.Event | None = None  # when set: calls wait for it
        self.failure: PrefillFailed | None = None  # when set: calls raise it

    async def prefill(self, address: str, job: PrefillJob) -> PrefillResult:
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        try:
            return await self._run(job)
        except RequestError as exc:
            raise PrefillFailed(exc.code.value.lower(), exc.message) from None

    async def close(self) -> None:
        pass
