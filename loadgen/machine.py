"""Where the numbers came from: versions, CPU, threads and load at the time of a run.

Every result JSON (``pdserve bench`` and the ``benchmarks`` scripts) records
:func:`environment_info`; :func:`busy_machine_warning` says when other processes keep the
CPUs busy, since timings on a 2-core box are then noisy. torch and transformers are
imported lazily, only to read their versions and the thread count.
"""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def utc_timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def busy_machine_warning(max_load_per_cpu: float = 0.5) -> str | None:
    """A warning if other processes keep the CPUs busy (timings will be noisy)."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load <= max_load_per_cpu * cpus:
        return None
    return f"warning: 1-min load average {load:.1f} on {cpus} CPUs; timings will be noisy"


def environment_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "timestamp": utc_timestamp(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
    except ImportError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info
