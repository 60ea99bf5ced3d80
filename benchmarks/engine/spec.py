"""What the parent sends one system's process: :class:`ChildSpec`, as a JSON file.

The parent (``python -m benchmarks.engine``) writes one spec per (system, dtype) and runs
``python -m benchmarks.engine.child SPEC OUT`` with that system's Python (ours and the HF
baselines: this checkout's venv; vLLM: the peer venv). Stdlib only at import time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.engine.workloads import Plan, Request, Workload

DTYPES = ("float32", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True, slots=True)
class ChildSpec:
    system: str  # "ours", "vllm", "hf", "hf_static", "hf_cb"
    dtype: str  # one of DTYPES, passed explicitly to every system
    threads: int  # torch intra-op threads (vLLM: its OpenMP threads too)
    model: str  # the converted checkpoint directory every system loads
    plan: Plan
    workloads: tuple[Workload, ...]
    warmup: tuple[tuple[Request, ...], ...]  # untimed rounds first
    kv_cache_gib: int = 1  # the same KV cache size for ours and vLLM
    engine_args: dict[str, Any] = field(default_factory=dict)  # extra EngineConfig fields
    cb_api: str = "manager"  # hf_cb only
    cb_num_blocks: int | None = None  # hf_cb only

    def write(self, path: Path) -> None:
        data = asdict(self)
        data["workloads"] = [w.to_json() for w in self.workloads]
        data["warmup"] = [[[list(r.prompt), r.max_new_tokens] for r in rnd] for rnd in self.warmup]
        path.write_text(json.dumps(data))

    @classmethod
    def read(cls, path: Path) -> ChildSpec:
        data = json.loads(path.read_text())
        plan = data.pop("plan")
        plan["mixed_prompt"] = tuple(plan["mixed_prompt"])
        plan["mixed_new"] = tuple(plan["mixed_new"])
        return cls(
            **{k: v for k, v in data.items() if k not in ("workloads", "warmup")},
            plan=Plan(**plan),
            workloads=tuple(Workload.from_json(w) for w in data["workloads"]),
            warmup=tuple(
                tuple(Request(tuple(p), int(n)) for p, n in rnd) for rnd in data["warmup"]
            ),
        )
