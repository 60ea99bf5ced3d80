"""The one error vocabulary of a request, on every process.

A request that fails ends with an :class:`ErrorCode`, named after the gRPC status it
leaves a server with (router and workers alike), and a message for whoever sent it. Code
below a servicer raises :class:`RequestError`; the servicer (only it) turns the code into
its transport's status. Failures that are not yet a request's outcome have their own
names where they happen (``PrefillFailed``, ``TransferError``, ``EngineStopped``): a
policy decides whether they become a :class:`RequestError`, and with which code.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The statuses a request can end with (gRPC status code names)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # bad ids, params, lengths: the caller's fault
    NOT_FOUND = "NOT_FOUND"  # no such model or pool
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # can never fit, or no capacity now
    UNAVAILABLE = "UNAVAILABLE"  # draining, no worker, or a worker failed
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


RETRY_AFTER_METADATA = "retry-after-ms"  # trailing metadata of a RESOURCE_EXHAUSTED refusal


class RequestError(Exception):
    """A request failed with ``code``; ``message`` is meant for its sender.

    ``retry_after_ms``: on a refusal for lack of capacity (RESOURCE_EXHAUSTED), when to try
    again — an estimate of the queue's drain time; servicers send it as the trailing
    metadata ``retry-after-ms`` (gRPC) or the ``Retry-After`` header (HTTP)."""

    def __init__(self, code: ErrorCode, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    def __repr__(self) -> str:
        return f"RequestError({self.code.value}, {self.message!r})"


def invalid(message: str) -> RequestError:
    return RequestError(ErrorCode.INVALID_ARGUMENT, message)
