""":class:`~common.errors.ErrorCode` → ``grpc.StatusCode``: how every servicer ends a
failed request.

The codes are named after the gRPC statuses, so the map is by name; a test checks that
every code has its status.
"""

from __future__ import annotations

import grpc

from common.errors import ErrorCode


def status_code(code: ErrorCode) -> grpc.StatusCode:
    return grpc.StatusCode[code.name]
