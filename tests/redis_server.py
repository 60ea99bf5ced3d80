"""A private, throw-away redis-server for tests: the one ``pdserve up`` uses.

Usage::

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)

Loopback only, no persistence, a fresh free port (retried if another process takes it
first), and it dies with the test process. See :mod:`deploy.redis_process`.
"""

from __future__ import annotations

import shutil

from deploy.redis_process import RedisProcess as RedisServer

INSTALL_HINT = (
    "redis-server is not on PATH. Run `make test` (it installs Debian's redis-server via "
    "scripts/ensure_redis.sh), or `apt-get install redis-server`."
)

__all__ = ["INSTALL_HINT", "RedisServer", "redis_server_binary"]


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")
