"""Per-request overheads end to end, for a profile (``pdserve profile --e2e``).

The step tables price the engine's work; a real request also pays the router
(tokenize, chat template, hashing, stream set-up), the decode worker's admission and
block reservation, the prefill worker's queues, the KV handshake, the layer-wise send
and landing, and the token stream back, all in Python processes that share the machine.
This runs two real stacks (loadgen/stack.py: redis-server, workers with the profiled
engine options and threads, 1024 KV blocks each, the router) — 1P+1D, and one colocated
worker — and sends each three probes one request at a time (closed loop, concurrency 1,
so nothing queues): ``short`` (128 uncached prompt tokens), ``long`` (512 uncached) and
``cached`` (a 384-token shared prefix plus a 32-token question). What the tables do not
explain, the *excess* ``TTFT - prefill table(new, cached) - router decision - hops x
rpc_s``, is fitted per probe median (:func:`fit_excess`) as

- remote (1P+1D): ``prefill_step_overhead_s + prefill_token_overhead_s x new tokens +
  handoff_token_overhead_s x prompt tokens`` — a fixed cost per prefill step, the worker's
  compute beyond the engine's (e.g. the layer-wise sender sharing the core), and the
  hand-off, which grows with the KV shipped;
- local (colocated): ``local_prefill_step_overhead_s + local_prefill_token_overhead_s x new``.

The cached probe runs once more on the 1P+1D stack beside one long stream decoding on
the decode worker (:func:`busy_decode_overheads`): ``busy_decode_handoff_s`` is how much
later the first token comes when the decode worker is mid-step as the KV lands (its
asyncio loop shares the process, and the GIL, with the engine step), and
``join_running_batch_overhead_s`` what joining a running batch adds to the first decode
step.

From the same records: ``decode_step_overhead_s`` (median inter-token gap after the first,
less ``decode_step_s(1, context)``), ``first_decode_step_overhead_s`` (the first gap after a
remote prefill lands, beyond that: the decode worker joins the landed sequence), and the
raw medians ``e2e_ttft_s`` / ``e2e_itl_s`` for reference. Every coefficient is clamped at 0
(a negative one is dropped and the rest refitted). capacity/cost_model.py says where the
simulator charges each.

About 90 s on the 2-core VM (each stack starts its processes in parallel).
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capacity.cost_model import CostModel
from capacity.profile import Profile

if TYPE_CHECKING:
    from loadgen.stack import StackSpec
    from loadgen.workload import WorkloadSpec

REMOTE_KEYS = ("prefill_step_overhead_s", "prefill_token_overhead_s", "handoff_token_overhead_s")
LOCAL_KEYS = ("local_prefill_step_overhead_s", "local_prefill_token_overhead_s")
DECODE_KEYS = ("decode_step_overhead_s", "first_decode_step_overhead_s")
BUSY_KEYS = ("busy_decode_handoff_s", "join_running_batch_overhead_s")
E2E_KEYS = (*REMOTE_KEYS, *LOCAL_KEYS, *DECODE_KEYS, *BUSY_KEYS, "e2e_ttft_s", "e2e_itl_s")
PROBES = ("short", "long", "cached")
CONTENDED = "contended"  # the cached probe again, beside a decoding stream (remote stack)
OUTPUT_TOKENS = 16

Records = dict[str, list[dict[str, Any]]]  # probe name -> request records


@dataclass(frozen=True)
class ProbePoint:
    """One probe's medians: new (computed) prompt tokens, prompt tokens, excess seconds."""

    new: float
    prompt: float
    excess: float


def probe_workload(name: str, requests: int) -> WorkloadSpec:
    """The load generator workload of one probe."""
    from loadgen.workload import WorkloadSpec

    if name == "cached":  # the group's first prompt fills the cache; it is kept as measured
        return WorkloadSpec(
            kind="shared_prefix", groups=1, prompts_per_group=requests + 1, prefix_tokens=384,
            question_tokens=32, output_tokens=OUTPUT_TOKENS, seed=7,
        )  # fmt: skip
    tokens = {"short": 128, "long": 512}[name]
    return WorkloadSpec(
        kind="fixed", num_requests=requests, input_tokens=tokens, output_tokens=OUTPUT_TOKENS,
        seed=7 + tokens,
    )  # fmt: skip


def e2e_overheads(
    profile: Profile, engine: dict[str, Any] | None = None, requests: int = 6
) -> dict[str, float]:
    """Measure on real 1P+1D and colocated stacks whose workers run ``profile``'s engine
    options (and ``engine["model"]``, a checkpoint path, if given); seconds by name
    (module docstring). ``requests`` per probe."""
    model = (engine or {}).get("model")
    remote = run_probes(stack_spec(profile, model, colocated=False), model, requests, True)
    local = run_probes(stack_spec(profile, model, colocated=True), model, requests)
    return overheads_from_records(profile, remote, local)


def run_probes(
    spec: StackSpec, model: str | None, requests: int, contended: bool = False
) -> Records:
    """Start ``spec``'s stack, warm it up, run the three probes (and, if ``contended``, the
    cached probe again beside a long stream); completed records by probe."""
    from loadgen.driver import LoadSpec
    from loadgen.experiment import RunSpec, run_experiment
    from loadgen.stack import OurStack
    from loadgen.suite import warm_up
    from router.tokenizer import ModelTokenizer

    tokenizer = ModelTokenizer.load(model)
    load = LoadSpec(mode="closed", concurrency=1, max_duration_s=300, progress=False)
    log_dir = Path(tempfile.mkdtemp(prefix=f"pdserve-profile-{spec.name}-"))
    out: Records = {}
    with OurStack(spec, log_dir) as stack:
        warm_up(stack.url, tokenizer)
        for name in PROBES:
            run = RunSpec(f"profile-{name}", probe_workload(name, requests), load)
            result = run_experiment(stack.url, run, tokenizer)
            out[name] = [r for r in result["records"] if _completed(r)]
        if contended:
            out[CONTENDED] = _contended_probe(stack.url, tokenizer, requests, load)
    if not any(out.values()):
        raise RuntimeError(f"e2e overhead on {spec.name}: no request completed (logs {log_dir})")
    return out


def _contended_probe(url: str, tokenizer: Any, requests: int, load: Any) -> list[dict[str, Any]]:
    """The cached probe while one long stream decodes on the decode worker: each probe
    prefill then shares the machine with a running decode, as under open-loop traffic."""
    import threading
    import time

    from loadgen.experiment import RunSpec, run_experiment
    from loadgen.workload import WorkloadSpec

    # ~1.2 s per probe request at concurrency 1 on the VM: the stream outlasts the probe
    background = WorkloadSpec(
        kind="fixed", num_requests=1, input_tokens=64, output_tokens=24 * (requests + 2), seed=3
    )
    stream = threading.Thread(
        target=run_experiment,
        args=(url, RunSpec("profile-background", background, load), tokenizer),
        daemon=True,
    )
    stream.start()
    time.sleep(1.0)  # its prefill done, it is decoding
    run = RunSpec(f"profile-{CONTENDED}", probe_workload("cached", requests), load)
    records = [r for r in run_experiment(url, run, tokenizer)["records"] if _completed(r)]
    stream.join(timeout=300)
    return records[1:]  # the group's first prompt filled the cache: not a cached probe


def _completed(record: dict[str, Any]) -> bool:
    return record.get("ttft_s") is not None and not record.get("error")


def stack_spec(profile: Profile, model: str | None, colocated: bool = False) -> StackSpec:
    """1P+1D as in loadgen.stack.disaggregated (or one colocated worker), with the
    profiled engine options."""
    from common.server_process import WorkerSpec
    from loadgen.stack import StackSpec

    engine = profile.engine
    threads = int(engine.get("num_threads") or 1)
    flags = [
        "--num-threads", str(threads),
        "--num-kv-blocks", "1024",
        "--dtype", profile.dtype,
        "--block-size", str(profile.block_size),
    ]  # fmt: skip
    for key in ("max_num_batched_tokens", "max_num_seqs", "kv_cache_dtype", "quantization"):
        if key in engine:
            flags += [f"--{key.replace('_', '-')}", str(engine[key])]
    if model:
        flags += ["--model", model]
    if colocated:
        worker = WorkerSpec("decode_worker", "colocated-0", (*flags, "--colocated"), threads)
        return StackSpec("profile-e2e-colocated", (worker,), "prefix_aware")
    decode = ("--prefill-timeout", "600", "--on-prefill-failure", "fail", "--layer-wise")
    workers = (
        WorkerSpec("prefill_worker", "prefill-0", tuple(flags), threads),
        WorkerSpec("decode_worker", "decode-0", (*flags, *decode), threads),
    )
    return StackSpec("profile-e2e", workers, "prefix_aware")


# ---- the fit (pure, unit-tested) ------------------------------------------------------------


def overheads_from_records(
    profile: Profile, remote: Records, local: Records | None = None
) -> dict[str, float]:
    """The overheads from the probes' records (``ttft_s``, ``itls_s``, ``prompt_tokens``,
    ``cached_tokens``) against ``profile``'s own tables (any e2e overheads it already has
    are ignored, so this is idempotent)."""
    raw = {k: v for k, v in profile.overheads.items() if k not in E2E_KEYS}
    cost = CostModel(replace(profile, overheads=raw))
    contended = remote.get(CONTENDED) or []
    remote = {k: v for k, v in remote.items() if k != CONTENDED}
    records = [r for probe in remote.values() for r in probe]
    if not records:
        raise ValueError("e2e overheads: no remote records")
    out = dict(zip(REMOTE_KEYS, fit_excess(probe_points(cost, remote, hops=2), True), strict=True))
    decode = _decode_overheads(cost, records)
    if contended:
        charged = CostModel(replace(profile, overheads={**raw, **out, **decode}))
        out.update(busy_decode_overheads(charged, contended))
    if local and any(local.values()):
        fit = fit_excess(probe_points(cost, local, hops=1), False)
        out.update(zip(LOCAL_KEYS, fit[:2], strict=True))
    out.update(decode)
    out["e2e_ttft_s"] = statistics.median(r["ttft_s"] for r in records)
    gaps = [g for r in records for g in r.get("itls_s") or []]
    if gaps:
        out["e2e_itl_s"] = statistics.median(gaps)
    return out


def probe_points(cost: CostModel, probes: Records, hops: int) -> list[ProbePoint]:
    """Per probe, the medians of new tokens, prompt tokens and excess TTFT."""
    fixed = cost.router_decision_s() + hops * cost.overhead_s("rpc_s")
    points = []
    for records in probes.values():
        if not records:
            continue
        rows = []
        for r in records:
            prompt, cached = _prompt_and_cached(r)
            new = prompt - cached
            rows.append((new, prompt, r["ttft_s"] - cost.prefill_s(new, cached) - fixed))
        points.append(ProbePoint(*(statistics.median(col) for col in zip(*rows, strict=True))))
    return points


def _prompt_and_cached(record: dict[str, Any]) -> tuple[int, int]:
    """A record's prompt tokens and its cached ones (at least one token is computed)."""
    prompt = record.get("prompt_tokens") or 1
    return prompt, min(record.get("cached_tokens") or 0, prompt - 1)


def fit_excess(points: list[ProbePoint], shipped: bool) -> tuple[float, float, float]:
    """``(fixed, per new token, per prompt token)`` seconds, least squares over ``points``
    with every coefficient >= 0: a negative one (or one the points cannot tell apart) is
    dropped (the later term first when several are) and the rest refitted. ``shipped=False``
    fits no per-prompt-token term (a local prefill ships nothing)."""
    columns = [0, 1, 2] if shipped else [0, 1]
    while columns:
        coef = _least_squares(points, columns)
        if coef is None:
            columns.pop()  # the points cannot tell the last term apart
            continue
        negative = [i for i, c in coef.items() if c < 0]
        if not negative:
            return (coef.get(0, 0.0), coef.get(1, 0.0), coef.get(2, 0.0))
        columns.remove(negative[-1])
    return (0.0, 0.0, 0.0)


def _least_squares(points: list[ProbePoint], columns: list[int]) -> dict[int, float] | None:
    """Normal equations solved by Gaussian elimination; None when singular."""
    rows = [((1.0, p.new, p.prompt), p.excess) for p in points]
    n = len(columns)
    if len(points) < n:
        return None
    a = [[sum(x[i] * x[j] for x, _ in rows) for j in columns] for i in columns]
    b = [sum(x[i] * y for x, y in rows) for i in columns]
    for k in range(n):
        pivot = max(range(k, n), key=lambda r: abs(a[r][k]))
        if abs(a[pivot][k]) < 1e-12 * max(1.0, abs(a[k][k])):
            return None
        a[k], a[pivot], b[k], b[pivot] = a[pivot], a[k], b[pivot], b[k]
        for r in range(k + 1, n):
            f = a[r][k] / a[k][k]
            a[r] = [a[r][j] - f * a[k][j] for j in range(n)]
            b[r] -= f * b[k]
    x = [0.0] * n
    for k in reversed(range(n)):
        x[k] = (b[k] - sum(a[k][j] * x[j] for j in range(k + 1, n))) / a[k][k]
    if any(abs(v) > 1e6 for v in x):
        return None
    return dict(zip(columns, x, strict=True))


def busy_decode_overheads(cost: CostModel, records: list[dict[str, Any]]) -> dict[str, float]:
    """From the contended probe (its decode worker busy with another stream; ``cost``
    already has the idle overheads): ``busy_decode_handoff_s``, the median TTFT beyond
    ``cost``'s prediction, and ``join_running_batch_overhead_s``, the median first gap
    beyond a decode step of the two sequences. Clamped at 0."""
    fixed = cost.router_decision_s() + 2 * cost.overhead_s("rpc_s")
    added, joins = [], []
    for r in records:
        prompt, cached = _prompt_and_cached(r)
        predicted = cost.prefill_s(prompt - cached, cached) + cost.handoff_s(prompt) + fixed
        added.append(r["ttft_s"] - predicted)
        if r.get("itls_s"):
            joins.append(r["itls_s"][0] - cost.decode_step_s(2, 2 * prompt))
    out = {"busy_decode_handoff_s": max(statistics.median(added), 0.0)}
    if joins:
        out["join_running_batch_overhead_s"] = max(statistics.median(joins), 0.0)
    return out


def _decode_overheads(cost: CostModel, records: list[dict[str, Any]]) -> dict[str, float]:
    """Median decode gap excess after the first gap; the first gap's extra beyond it."""
    first, later = [], []
    for r in records:
        context = r.get("prompt_tokens") or 1
        for k, gap in enumerate(r.get("itls_s") or []):
            excess = gap - cost.decode_step_s(1, context + k + 1)
            (later if k else first).append(excess)
    out: dict[str, float] = {}
    step = max(statistics.median(later), 0.0) if later else 0.0
    if later:
        out["decode_step_overhead_s"] = step
    if first:
        out["first_decode_step_overhead_s"] = max(statistics.median(first) - step, 0.0)
    return out
