"""One measured run: a workload replayed against a target under a load, summarised.

    tokenizer = ModelTokenizer.load(None)
    result = run_experiment("grpc://127.0.0.1:50051", RunSpec("ours", workload, load), tokenizer)

The result is a JSON-ready dict: the specs, the summary (:mod:`summary`), the oracle's best
hit ratio (:mod:`oracle`) and every request's record.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from typing import Any

from common import env
from loadgen.driver import LoadSpec, RunRecords, drive
from loadgen.oracle import best_hits
from loadgen.summary import Slo, summarize
from loadgen.targets import open_target
from loadgen.workload import Session, TextFactory, WorkloadSpec, build

BLOCK_SIZE = 16  # the engine's default; the oracle counts hits in whole blocks


@dataclass(frozen=True, slots=True)
class RunSpec:
    label: str
    workload: WorkloadSpec
    load: LoadSpec
    slo: Slo = field(default_factory=Slo)
    model: str = ""  # pool/model name (gRPC) or the model field (OpenAI HTTP)


def text_factory(tokenizer: Any) -> TextFactory:
    return TextFactory(tokenizer.encode, tokenizer.decode)


def run_experiment(url: str, spec: RunSpec, tokenizer: Any) -> dict[str, Any]:
    sessions = build(spec.workload, text_factory(tokenizer))
    return asyncio.run(_run(url, spec, sessions, tokenizer))


async def _run(url: str, spec: RunSpec, sessions: list[Session], tokenizer: Any) -> dict:
    target = open_target(url, spec.model, env.api_key())
    try:
        run = await drive(target, sessions, spec.load)
    finally:
        await target.close()
    return assemble(url, spec, run, tokenizer)


def assemble(url: str, spec: RunSpec, run: RunRecords, tokenizer: Any) -> dict[str, Any]:
    summary = summarize(run.records, run.duration_s, spec.slo, run.unsent)
    oracle = best_hits(sent_prompts(run, tokenizer), BLOCK_SIZE)
    achieved = summary["hit_ratio"]
    summary["oracle_hit_ratio"] = round(oracle.ratio, 4)
    summary["hit_of_best"] = (
        round(achieved / oracle.ratio, 4) if achieved is not None and oracle.ratio > 0 else None
    )
    return {
        "label": spec.label,
        "target": url,
        "workload": asdict(spec.workload),
        "load": asdict(spec.load),
        "summary": summary,
        "records": [r.to_json() for r in run.records],
    }


def sent_prompts(run: RunRecords, tokenizer: Any) -> list[list[int]]:
    """Every sent request's prompt tokens (the chat template applied), in sending order."""
    sent = sorted((r for r in run.records if r.sent_s or r.end_s), key=lambda r: r.sent_s)
    return [tokenizer.apply_chat_template(run.messages[(r.session_id, r.turn)]) for r in sent]
