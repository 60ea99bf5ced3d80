"""Fixtures for integration tests: real processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_server import INSTALL_HINT, RedisServer, redis_server_binary


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a private redis-server for the whole session.

    Tests share it, so each test uses its own registry namespace. A missing redis-server
    is a broken set-up, not a reason to skip: the tests fail and say how to fix it.
    """
    if redis_server_binary() is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    with RedisServer() as server:
        yield server.url
