"""``vllm serve`` from the peer venv, on a free loopback port, as the suite's peer stack.

    peer = vllm_peer()
    if peer.installed:
        with VLLMServe(peer, log_dir, dtype="float32") as server:   # dtype None: its default
            run_experiment(server.url, RunSpec(..., model=server.model), tokenizer)

It serves the same converted model directory our workers load, on ``threads`` OpenMP
threads with the same KV cache size (``loadgen.peers.vllm_environment``), and is driven
through its OpenAI API by the same client as pdserve's HTTP target. Its first start
compiles for about a minute on 2 idle cores (9 minutes was seen on a machine with load
average 24), hence the long ready timeout.
"""

from __future__ import annotations

from pathlib import Path

from common.launch import ChildProcess, child_env, free_loopback_port
from common.service import Service
from loadgen.peers import Peer, vllm_environment
from loadgen.stack import http_ok


class VLLMServe(Service):
    """One ``vllm serve`` process; killed on stop."""

    def __init__(
        self,
        peer: Peer,
        log_dir: Path,
        dtype: str | None = None,
        threads: int = 2,
        kv_cache_gib: int = 1,
        max_num_seqs: int = 64,
        model_dir: Path | None = None,
        ready_timeout_s: float = 900.0,
    ) -> None:
        from router.tokenizer import default_model_dir

        self.peer = peer
        self.model = str(model_dir or default_model_dir())
        self.dtype = dtype
        self.name = f"vllm-serve-{dtype or 'default'}"
        self.log_dir = log_dir / self.name
        self._threads = threads
        self._kv_cache_gib = kv_cache_gib
        self._max_num_seqs = max_num_seqs
        self._timeout_s = ready_timeout_s
        self._proc: ChildProcess | None = None
        self.url = ""

    def command(self, port: int) -> list[str]:
        cmd = [str(self.peer.cli), "serve", self.model, "--host", "127.0.0.1",
               "--port", str(port), "--max-num-seqs", str(self._max_num_seqs),
               "--uvicorn-log-level", "warning"]  # fmt: skip
        return cmd + (["--dtype", self.dtype] if self.dtype else [])

    def start(self) -> VLLMServe:
        if not self.peer.installed:
            raise RuntimeError(self.peer.missing_line())
        port = free_loopback_port()
        self.url = f"http://127.0.0.1:{port}"
        env = child_env(
            self._threads, vllm_environment(self._threads, self._kv_cache_gib, in_process=False)
        )
        env.pop("PYTHONPATH", None)  # the peer venv must not import this checkout's packages
        self._proc = ChildProcess(self.command(port), self.log_dir / "serve.log", env)
        try:
            self._proc.wait_for(lambda: http_ok(self.url + "/health"), self._timeout_s, "health")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc = None
