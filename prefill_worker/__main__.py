"""``python -m prefill_worker``: run a prefill worker.

Flags override the YAML file given with ``--config`` (see :mod:`worker.config` for
its layout). Prints one ready line on stdout once it serves and is registered::

    prefill worker <id> serving gRPC on 127.0.0.1:PORT kv - metrics 127.0.0.1:PORT

SIGTERM / SIGINT drain it: health NOT_SERVING, deregistered, new calls UNAVAILABLE,
in-flight prefills finish (``--drain-grace``), then it exits 0.
"""

from __future__ import annotations

import sys

from common import env
from common.worker_info import WorkerRole
from worker.app import AppType
from worker.config import build_parser, parse_config
from worker.runtime import run_worker


def main(argv: list[str] | None = None) -> int:
    env.apply_offline_defaults()
    parser = build_parser("python -m prefill_worker", "pdserve prefill worker")
    config = parse_config(parser, argv, WorkerRole.PREFILL)
    return run_worker(config, _app_type)


def _app_type() -> AppType:
    from prefill_worker.wiring import build_prefill_app  # torch: after argument errors are reported

    return build_prefill_app


if __name__ == "__main__":
    sys.exit(main())
