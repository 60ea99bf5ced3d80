"""``python -m decode_worker``: run a decode worker, or a colocated one (``--colocated``).

Flags override the YAML file given with ``--config`` (see :mod:`worker.config` for
its layout). Prints one ready line on stdout once it serves and is registered::

    decode worker <id> serving gRPC on 127.0.0.1:PORT kv 127.0.0.1:PORT metrics 127.0.0.1:PORT

SIGTERM / SIGINT drain it: health NOT_SERVING, deregistered, new calls UNAVAILABLE,
in-flight streams finish (``--drain-grace``), then it exits 0.
"""

from __future__ import annotations

import argparse
import sys

from common import env
from common.worker_info import WorkerRole
from worker.app import AppType
from worker.config import build_parser, parse_config
from worker.runtime import run_worker


def main(argv: list[str] | None = None) -> int:
    env.apply_offline_defaults()
    parser = build_parser("python -m decode_worker", "pdserve decode (or colocated) worker")
    parser.add_argument(
        "--colocated",
        dest="role",
        action="store_const",
        const=WorkerRole.COLOCATED.value,
        default=argparse.SUPPRESS,
        help="prefill and decode here; no KV receiver",
    )
    config = parse_config(parser, argv, WorkerRole.DECODE, [WorkerRole.COLOCATED])
    return run_worker(config, _app_type)


def _app_type() -> AppType:
    from decode_worker.wiring import build_decode_app  # torch: after argument errors are reported

    return build_decode_app


if __name__ == "__main__":
    sys.exit(main())
