"""``python -m router``: run the public gRPC router standalone.

    python -m router --config router.yaml --redis-url redis://127.0.0.1:6379/0 --port 50051

Flags override the YAML file (see :mod:`router.config` for its layout); without a file the
router serves one pool, ``default``, of the default model. Once serving it prints one line,
``router serving gRPC on HOST:PORT http HOST:PORT|- metrics HOST:PORT|- pools a,b``, and runs until
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
    parser.add_argument(
        "--http-port",
        type=_port_or_none,
        default=_UNSET,
        help="OpenAI-compatible HTTP port (0 = a free port, none = no HTTP; default 8000)",
    )
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0 = free)")
    parser.add_argument("--api-key-file", help="API keys, one per line: required on both ports")
    parser.add_argument("--tls-cert-file", help="PEM certificate: TLS on both ports")
    parser.add_argument("--tls-key-file", help="PEM private key of --tls-cert-file")
    parser.add_argument("--tls-client-ca-file", help="PEM CA: require client certificates")
    parser.add_argument("--namespace", help="registry key namespace (default pdserve)")
    parser.add_argument("--redis-password-file", help="file holding the Redis password")
    parser.add_argument("--cluster-secret-file", help="file holding the cluster secret")
    parser.add_argument(
        "--drain-grace",
        type=float,
        default=10.0,
        help="seconds in-flight streams may run after SIGTERM",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG logs every routing decision")
    return parser.parse_args(argv)


_UNSET: Any = object()


def _port_or_none(value: str) -> int | None:
    return None if value.lower() in ("none", "null", "off") else int(value)


def load_config(args: argparse.Namespace) -> RouterConfig:
    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("redis_url", args.redis_url),
            ("host", args.host),
            ("port", args.port),
            ("metrics_port", args.metrics_port),
            ("namespace", args.namespace),
            ("api_key_file", args.api_key_file),
            ("tls_cert_file", args.tls_cert_file),
            ("tls_key_file", args.tls_key_file),
            ("tls_client_ca_file", args.tls_client_ca_file),
            ("redis_password_file", args.redis_password_file),
            ("cluster_secret_file", args.cluster_secret_file),
        )
        if value is not None
    }
    if args.http_port is not _UNSET:
        overrides["http_port"] = args.http_port
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
    ready = format_router_ready(server.address, server.http_address, server.metrics_address, pools)
    print(ready, flush=True)
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
