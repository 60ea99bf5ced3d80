"""``python -m prefill_worker``: run a prefill worker.

Flags override the YAML file given with ``--config`` (see :mod:`common.worker_config` for
its layout). Prints one ready line on stdout once it serves and is registered::

    prefill worker <id> serving gRPC on 127.0.0.1:PORT kv - metrics 127.0.0.1:PORT

SIGTERM / SIGINT drain it: health NOT_SERVING, deregistered, new calls UNAVAILABLE,
in-flight prefills finish (``--drain-grace``), then it exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from common import env
from common.worker_config import WorkerConfig, build_parser, config_from_args
from common.worker_info import WorkerRole
from common.worker_runtime import WorkerRuntime


def main(argv: list[str] | None = None) -> int:
    env.apply_offline_defaults()
    parser = build_parser("python -m prefill_worker", "pdserve prefill worker")
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, WorkerRole.PREFILL)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_serve(config))


async def _serve(config: WorkerConfig) -> int:
    from prefill_worker.worker import PrefillApp  # torch: after argument errors are reported

    runtime = WorkerRuntime(config)
    app = PrefillApp(config, runtime.worker_id, runtime.metrics)
    return await runtime.serve(app)


if __name__ == "__main__":
    sys.exit(main())
