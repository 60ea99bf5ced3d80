"""``python -m router``: run the public gRPC router standalone.

    python -m router --config router.yaml --redis-url redis://127.0.0.1:6379/0 --port 50051

Flags override the YAML file (see :mod:`router.config` for its layout); without a file the
router serves one pool, ``default``, of the default model. Once serving it prints one line,
``router serving gRPC on HOST:PORT metrics HOST:PORT|- pools a,b``, and runs until
SIGTERM / SIGINT, then stops taking requests and lets in-flight streams finish
(``--drain-grace`` seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from common import env
from common.ready_line import format_router_ready
from router.config import RouterConfig
from router.server import RouterServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m router", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML file; flags override its values")
    parser.add_argument("--redis-url", help="registry Redis (default: $PDSERVE_REDIS_URL)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gRPC port (0 = a free port; default 50051)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0 = free)")
    parser.add_argument("--namespace", help="registry key namespace (default pdserve)")
    parser.add_argument(
        "--drain-grace",
        type=float,
        default=10.0,
        help="seconds in-flight streams may run after SIGTERM",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG logs every routing decision")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> RouterConfig:
    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("redis_url", args.redis_url),
            ("host", args.host),
            ("port", args.port),
            ("metrics_port", args.metrics_port),
            ("namespace", args.namespace),
        )
        if value is not None
    }
    if args.config is not None:
        config = RouterConfig.from_yaml(args.config, **overrides)
    else:
        config = RouterConfig.from_mapping(overrides)
    if config.redis_url is None and env.redis_url() is not None:
        config = dataclasses.replace(config, redis_url=env.redis_url())
    return config


async def serve(config: RouterConfig, drain_grace_s: float) -> int:
    server = RouterServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pools = tuple(p.name for p in config.pools)
    print(format_router_ready(server.address, server.metrics_address, pools), flush=True)
    try:
        await stop.wait()
    finally:
        logging.getLogger(__name__).info("router stopping")
        await server.stop(grace_s=drain_grace_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    env.apply_offline_defaults()
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args)
    except (OSError, ValueError) as exc:
        print(f"router: bad configuration: {exc}", file=sys.stderr)
        return 2
    if config.redis_url is None:
        print("router: needs --redis-url (or $PDSERVE_REDIS_URL)", file=sys.stderr)
        return 2
    return asyncio.run(serve(config, args.drain_grace))


if __name__ == "__main__":
    sys.exit(main())
