"""``python -m prefill_worker``: run a prefill worker.

Flags override the YAML file given with ``--config`` (see :mod:`common.worker_config` for
its layout). Prints one ready line on stdout once it serves and is registered::

    prefill worker <id> serving gRPC on 127.0.0.1:PORT kv - metrics 127.0.0.1:PORT

SIGTERM / SIGINT drain it: health NOT_SERVING, deregistered, new calls UNAVAILABLE,
in-flight prefills finish (``--drain-grace``), then it exits 0.
"""

from __future__ import annotations

import sys

from common import env
from common.worker_config import build_parser, parse_config
from common.worker_info import WorkerRole
from common.worker_runtime import AppType, run_worker


def main(argv: list[str] | None = None) -> int:
    env.apply_offline_defaults()
    parser = build_parser("python -m prefill_worker", "pdserve prefill worker")
    config = parse_config(parser, argv, WorkerRole.PREFILL)
    return run_worker(config, _app_type)


def _app_type() -> AppType:
    from prefill_worker.worker import PrefillApp  # torch: after argument errors are reported

    return PrefillApp


if __name__ == "__main__":
    sys.exit(main())
