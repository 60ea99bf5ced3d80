""":class:`~common.errors.ErrorCode` → ``grpc.StatusCode``: how every servicer ends a
failed request.

The codes are named after the gRPC statuses, so the map is by name; a test checks that
every code has its status. :func:`abort` is the one way a servicer ends a call with a
:class:`~common.errors.RequestError`: a refusal's retry-after hint travels as the trailing
metadata ``retry-after-ms`` (milliseconds, a decimal string).
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from common.errors import RETRY_AFTER_METADATA, ErrorCode, RequestError


def status_code(code: ErrorCode) -> grpc.StatusCode:
    return grpc.StatusCode[code.name]


async def abort(context: grpc.aio.ServicerContext, exc: RequestError) -> NoReturn:
    """End the call with ``exc``'s status and message (and its retry-after hint)."""
    if exc.retry_after_ms is not None:
        context.set_trailing_metadata(((RETRY_AFTER_METADATA, str(exc.retry_after_ms)),))
    await context.abort(status_code(exc.code), exc.message)
    raise AssertionError("unreachable: context.abort raises")


def retry_after_ms(error: grpc.aio.AioRpcError) -> int | None:
    """The retry-after hint of a failed call, from its trailing metadata; None if absent."""
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_METADATA:
            try:
                return max(int(value), 0)
            except (TypeError, ValueError):
                return None
    return None
