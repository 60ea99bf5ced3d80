"""`pdserve profile --quick --e2e`: the real engine, a real KV transfer pair, a real gRPC
server, and short requests through a real 1P+1D stack (redis-server, workers, router).

One run (~45-65 s on the 2-core VM): the written profile loads, names this machine, and its
raw measurements are positive and ordered the way the work is (more tokens, a bigger
batch or more bytes cost more). The points compared are far apart (16 vs 512 prompt
tokens, batch 1 vs 32, 1 vs 128 blocks) so a busy machine does not flip them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from capacity.cost_model import CostModel
from capacity.profile import Profile

PDSERVE = Path(sys.executable).with_name("pdserve")


def test_pdserve_profile_quick(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    done = subprocess.run(
        [str(PDSERVE), "profile", "--quick", "--e2e", "--threads", "1", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[profile] prefill cached=0" in done.stderr  # progress on stderr
    profile = Profile.load(out)
    assert profile.hardware.startswith("cpu: ") and "1 thread" in profile.hardware
    assert profile.model == "SmolLM2-135M-Instruct"
    assert profile.dtype in ("float32", "bfloat16")
    assert profile.engine["block_size"] == 16 and profile.engine["num_threads"] == 1
    itemsize = 4 if profile.dtype == "float32" else 2
    assert profile.kv_bytes_per_token == 2 * 30 * 3 * 64 * itemsize
    assert profile.num_kv_blocks > 0 and profile.block_size == 16

    prefill, decode = profile.prefill, profile.decode
    assert prefill.ys[0] == 0 and prefill.ys[-1] > 0  # a real prefix-cache-hit column
    for grid in (prefill, decode):
        assert all(s > 0 for row in grid.seconds for s in row)
    assert prefill.seconds[-1][0] > prefill.seconds[0][0]  # 512 vs 16 new tokens
    assert decode.seconds[-1][0] > decode.seconds[0][0]  # batch 32 vs 1
    points = profile.transfer.points
    assert len(points) == 3 and points[-1][0] > points[0][0]
    assert points[-1][1] > points[0][1]  # 128 blocks take longer than 1
    assert profile.transfer.bandwidth_bytes_per_s > 1e7  # > 10 MB/s even on a busy box
    assert 0 < profile.router_decision_s <= profile.router_decision_p99_s < 0.05
    assert 0 < profile.overheads["rpc_s"] < 0.05
    overheads = profile.overheads  # --e2e: measured through the real stack
    assert overheads["e2e_ttft_s"] > 0 and overheads["e2e_itl_s"] > 0
    assert overheads["prefill_step_overhead_s"] >= 0 and overheads["decode_step_overhead_s"] >= 0
    assert overheads["prefill_step_overhead_s"] < overheads["e2e_ttft_s"]

    cost = CostModel(profile)  # what the simulator reads
    assert cost.prefill_s(512, 0) > cost.prefill_s(16, 0) > 0
    assert cost.kv_bytes(10) == 10 * profile.kv_bytes_per_token
