"""API keys on the public ports: the key set, and the gRPC interceptor that checks it.

Clients send ``authorization: Bearer <key>`` (gRPC metadata or the HTTP header). The
keys come from a file, one per line; blank lines and ``#`` comments are skipped. Keys are
compared with :func:`hmac.compare_digest` against every key (the time taken says nothing
about which key was close), and never logged: :class:`ApiKeys` prints as a count.

Open without a key file: :func:`load_keys` returns None and nothing is checked. Health
(gRPC health, ``GET /health``) and gRPC reflection stay open either way.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import grpc

from common.grpc_auth import refusing

BEARER = "bearer "


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(k.encode() for k in dict.fromkeys(keys))
        if not self._keys:
            raise ValueError("no API keys")

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        lines = (line.strip() for line in Path(path).read_text().splitlines())
        keys = [line for line in lines if line and not line.startswith("#")]
        if not keys:
            raise ValueError(f"{path}: no API keys (one per line; # starts a comment)")
        return cls(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} keys)"

    def check(self, key: str | None) -> bool:
        if not key:
            return False
        given = key.encode()
        found = False
        for known in self._keys:  # no early exit: every key is compared
            found |= hmac.compare_digest(given, known)
        return found

    def check_authorization(self, value: str | None) -> bool:
        """Whether an ``authorization`` value (``Bearer <key>``) carries a valid key."""
        return self.check(bearer_token(value))


def bearer_token(value: str | None) -> str | None:
    """The token of ``Bearer <token>`` (case-insensitive scheme); None otherwise."""
    if value is None or value[: len(BEARER)].lower() != BEARER:
        return None
    return value[len(BEARER) :].strip() or None


def client_id_of(authorization: str | None) -> str:
    """The default client id of a caller that names none: its API key's fingerprint
    (``key-`` + 12 hex digits of its SHA-256, never the key), or "" without a key."""
    token = bearer_token(authorization)
    if token is None:
        return ""
    return "key-" + hashlib.sha256(token.encode()).hexdigest()[:12]


def load_keys(path: str | None) -> ApiKeys | None:
    return ApiKeys.from_file(path) if path is not None else None


_DENIED = "missing or invalid API key (send 'authorization: Bearer <key>' metadata)"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires a valid key on every method of the given services (``/pkg.Service/``);
    other services (health, reflection) pass through."""

    def __init__(self, keys: ApiKeys, services: Iterable[str]) -> None:
        self._keys = keys
        self._prefixes = tuple(f"/{name}/" for name in services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefixes):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if self._keys.check_authorization(metadata.get("authorization")):
            return handler
        return refusing(handler, _DENIED)
