"""Worker RPCs require the cluster secret: a server interceptor for the worker's gRPC server.

Every call to a worker service (DecodeWorker, PrefillWorker, WorkerControl) must carry
``x-pdserve-cluster-token`` (:meth:`common.cluster_secret.ClusterSecret.token`) or it is
answered UNAUTHENTICATED before the servicer sees the request. Health and reflection stay
open, so probes and ``grpcurl list`` work without the secret. Clients send the token with
``metadata=call_metadata(secret)`` (router/stream.py, decode_worker/prefill_client.py).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from common.cluster_secret import TOKEN_METADATA_KEY, ClusterSecret

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class ClusterTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, secret: ClusterSecret) -> None:
        self._token = secret.token()
        self._refused = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        sent = ""
        for key, value in details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                sent = value if isinstance(value, str) else ""
        if hmac.compare_digest(sent.encode(), self._token.encode()):
            return handler
        self._refused += 1
        if self._refused == 1 or self._refused % 1000 == 0:  # a scanner must not flood logs
            log.warning("refused %s: no valid cluster token (%d so far)", method, self._refused)
        return _denying(handler)


async def _deny(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that aborts UNAUTHENTICATED."""
    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_deny, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_deny, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_deny, **codecs)
    return grpc.stream_stream_rpc_method_handler(_deny, **codecs)
