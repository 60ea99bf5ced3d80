"""A local Ray node that stays on loopback.

``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough in Ray 2.60: ``ray.init``
(and ``ray start``) pass the address through ``resolve_ip_for_localhost``, which turns
127.0.0.1 into the machine's outbound IP, so GCS, raylet, workers — and every pdserve
server that binds "the node's IP" — would listen on a non-loopback address. Ray keeps
loopback only when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the single-node mode Ray uses
on laptops), read once when ``ray`` is first imported. Hence the order::

    pin_to_loopback()     # before the first `import ray` in this process
    init_local(num_cpus)  # a new node on 127.0.0.1, no dashboard; checked

Ray 2.60 turns token auth on for new local clusters: ``ray.init`` writes the token to
``~/.ray/auth_token`` if there is none. A driver that joins with an explicit address
(``pdserve status``, ``pdserve up --address``, the ``serve`` CLI) only sends it in
``RAY_AUTH_MODE=token``: :func:`connect` sets that when the token file exists.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

LOOPBACK = "127.0.0.1"
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_AUTH_MODE_ENV = "RAY_AUTH_MODE"
_TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # where ray.init writes a new token


def pin_to_loopback() -> None:
    """Make Ray's node IP 127.0.0.1 in this process and the Ray processes it starts."""
    os.environ[_SINGLE_NODE_ENV] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError(
                "ray was imported before pin_to_loopback(): a local node would listen on "
                "a non-loopback address"
            )


def init_local(num_cpus: float | None = None, namespace: str = "serve") -> str:
    """Start a new single-node Ray on 127.0.0.1; returns its GCS address."""
    pin_to_loopback()
    import ray

    ray.init(
        address="local",  # never join a cluster someone else started on this machine
        _node_ip_address=LOOPBACK,
        include_dashboard=False,
        num_cpus=num_cpus,
        namespace=namespace,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"local Ray came up on {node_ip}, not {LOOPBACK}")
    return str(ray.get_runtime_context().gcs_address)


def connect(address: str, namespace: str = "serve") -> str:
    """Join an existing cluster as a driver (with the local token if there is one).

    ``host:port`` addresses are probed first: Ray retries a dead GCS for a minute.
    """
    host, _, port = address.rpartition(":")
    if host and port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=3.0).close()
        except OSError as exc:
            raise ConnectionError(f"no Ray cluster at {address}: {exc}") from None
    if address.startswith(f"{LOOPBACK}:"):
        pin_to_loopback()  # our own loopback-only node: join it as 127.0.0.1
    if _TOKEN_FILE.exists():
        os.environ.setdefault(_AUTH_MODE_ENV, "token")  # an explicit setting wins
    import ray

    ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="ERROR")
    return str(ray.get_runtime_context().gcs_address)
