"""The cluster secret: one shared key that makes a process a member of a cluster.

Workers and routers of one cluster read the same secret file (``cluster_secret_file``;
``pdserve up`` generates one per cluster). It is never sent or logged itself; members prove
they hold it with HMAC-SHA256 values, each bound to a *purpose* so a value made for one
check cannot be replayed in another:

    grpc        the ``x-pdserve-cluster-token`` metadata on worker RPCs (common.grpc_auth)
    worker      a WorkerInfo registration in Redis (common.registry)
    kv-join     a KV sender's join request, over its pair name and reply key
    kv-accept   the receiver's answer to it (kv_transfer.rendezvous)

No secret configured (``None`` everywhere) keeps the open behaviour of local development.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

TOKEN_METADATA_KEY = "x-pdserve-cluster-token"
_MIN_BYTES = 16


class ClusterSecret:
    """The key, with the HMACs made from it. ``repr`` never shows the key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < _MIN_BYTES:
            raise ValueError(f"a cluster secret needs at least {_MIN_BYTES} bytes")
        self._key = key

    @classmethod
    def from_file(cls, path: str | Path) -> ClusterSecret:
        """The file's contents, surrounding whitespace stripped; errors name the path only."""
        try:
            key = Path(path).expanduser().read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"cannot read cluster secret file {path}: {exc.strerror}") from None
        try:
            return cls(key)
        except ValueError as exc:
            raise ValueError(f"cluster secret file {path}: {exc}") from None

    @classmethod
    def generate(cls) -> ClusterSecret:
        return cls(secrets.token_hex(32).encode())

    def write(self, path: str | Path) -> Path:
        """Write to a new file readable by its owner only."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when the file existed with a wider mode
        with os.fdopen(fd, "wb") as f:
            f.write(self._key + b"\n")
        return path

    def sign(self, purpose: str, data: str | bytes = b"") -> str:
        payload = data.encode() if isinstance(data, str) else data
        return hmac.new(self._key, purpose.encode() + b"\0" + payload, hashlib.sha256).hexdigest()

    def verify(self, purpose: str, data: str | bytes, signature: object) -> bool:
        if not isinstance(signature, str):
            return False
        return hmac.compare_digest(self.sign(purpose, data), signature)

    def token(self) -> str:
        """What a member sends as ``x-pdserve-cluster-token`` on worker RPCs."""
        return self.sign("grpc")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA_KEY, self.token()),)

    def __repr__(self) -> str:
        return "ClusterSecret(***)"


def load_secret(path: str | Path | None) -> ClusterSecret | None:
    """The secret in ``path``, or None (no secret: an open cluster) when no path is set."""
    return ClusterSecret.from_file(path) if path else None


def call_metadata(secret: ClusterSecret | None) -> tuple[tuple[str, str], ...] | None:
    """gRPC ``metadata=`` for a call to a worker: the token, or None with no secret."""
    return secret.metadata() if secret is not None else None
