"""Fixtures for integration tests: real processes on loopback."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from common.redis_process import RedisProcess

INSTALL_HINT = (
    "redis-server is not on PATH. Run `make test` (it installs Debian's redis-server via "
    "scripts/ensure_redis.sh), or `apt-get install redis-server`."
)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a private redis-server (:mod:`common.redis_process`) for the whole session.

    Tests share it, so each test uses its own registry namespace. A missing redis-server
    is a broken set-up, not a reason to skip: the tests fail and say how to fix it.
    """
    if shutil.which("redis-server") is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    with RedisProcess() as server:
        yield server.url
