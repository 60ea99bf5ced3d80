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
_REFUSED = "missing or wrong cluster token"


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
        return refusing(handler, _REFUSED)


def refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind (and codecs) as ``handler`` that aborts the call with
    UNAUTHENTICATED and ``message`` before any servicer code runs; used by every auth
    interceptor (this one and the router's API keys)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **codecs)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **codecs)
    return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
