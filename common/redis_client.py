"""The one way pdserve opens Redis: URL, optional password file, and redaction for logs.

    client = open_async(url, password_file=cfg.redis_password_file)   # redis.asyncio
    client = open_sync(url, password_file=...)                         # blocking, CLIs
    log.info("registry %s", redact_url(url))                           # never the password

A URL may carry the password itself (``redis://:PASSWORD@host:6379/0``; ``rediss://``
for TLS, verified against the system's CA certificates). A password file (one line; for
deployments that keep secrets out of configs and process lists) supplies it when the URL
has none; a password in the URL wins. Wrong or missing passwords surface as
``redis.AuthenticationError`` on the first command, with Redis's own message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aredis


def read_password_file(path: str | Path | None) -> str | None:
    if not path:
        return None
    try:
        password = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read Redis password file {path}: {exc.strerror}") from None
    if not password:
        raise ValueError(f"Redis password file {path} is empty")
    return password


def _kwargs(password_file: str | Path | None, extra: dict[str, Any]) -> dict[str, Any]:
    password = read_password_file(password_file)
    if password is not None:
        extra.setdefault("password", password)  # from_url lets a password in the URL win
    return extra


def open_async(url: str, *, password_file: str | Path | None = None, **kwargs: Any) -> aredis.Redis:
    return aredis.Redis.from_url(url, **_kwargs(password_file, kwargs))


def open_sync(url: str, *, password_file: str | Path | None = None, **kwargs: Any) -> redis.Redis:
    return redis.Redis.from_url(url, **_kwargs(password_file, kwargs))


def redact_url(url: str | None) -> str:
    """``url`` with any password (and user name's password part) replaced by ``***``."""
    if not url:
        return "-"
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def url_with_password(url: str, password: str) -> str:
    """``url`` carrying ``password`` (for handing a private server's URL to children)."""
    parts = urlsplit(url)
    netloc = f"{parts.username or ''}:{password}@{parts.netloc.rsplit('@', 1)[-1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
