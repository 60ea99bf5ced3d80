"""``pdserve profile``'s measurement: a :class:`capacity.profile.Profile` of this machine.

Order: load the engine with the requested options (the replica being profiled), warm it
up, time the prefill grid and the decode grid (capacity/measure_steps.py), a real KV
transfer pair (capacity/measure_transfer.py), the router's decision and a gRPC round trip
(capacity/measure_router.py); then name the hardware, model, dtype and engine options.
torch and the engine are imported inside functions only: ``capacity`` imports torch-free.
"""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass, field, replace
from typing import Any

from capacity.measure_steps import Progress, StepGrid, StepTimer, stderr_progress
from capacity.profile import Profile, TransferFit, fit_transfer

QUICK_GRID = StepGrid(  # far-apart points, so ordering survives a noisy machine
    new_tokens=(16, 128, 512),
    cached_tokens=(0, 256),
    batch_sizes=(1, 32),
    total_contexts=(64, 1024),
    repeats=3,
    decode_steps=3,
)
DEFAULT_GRID = StepGrid(
    new_tokens=(16, 64, 128, 256, 512, 1024),
    cached_tokens=(0, 512, 2048),
    batch_sizes=(1, 2, 4, 8, 16, 32, 64),
    total_contexts=(128, 1024, 4096),
    repeats=3,
    decode_steps=5,
)
QUICK_TRANSFER_BLOCKS = (1, 16, 128)
DEFAULT_TRANSFER_BLOCKS = (1, 4, 16, 64, 256)


@dataclass(frozen=True)
class MeasureOptions:
    """What to profile: the engine options of one replica, and how thoroughly."""

    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig keyword arguments
    quick: bool = False
    e2e: bool = False  # also run real 1P+1D and colocated stacks: overheads (~1-2 min)


def hardware_name(device: str, threads: int) -> str:
    """``"cpu: <model name>, N threads"`` from /proc/cpuinfo, or the CUDA device's name."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name}, {threads} thread{'s' if threads != 1 else ''}"


def _engine_options(engine: Any) -> dict[str, Any]:
    """The options a profile is valid for (what changes step times or KV size)."""
    config = engine.config
    keys = (
        "block_size",
        "max_num_batched_tokens",
        "max_num_seqs",
        "long_prefill_token_threshold",
        "kv_cache_dtype",
        "kv_cache_order",
        "quantization",
        "num_threads",
        "device",
    )
    options = {key: getattr(config, key) for key in keys}
    options["max_model_len"] = engine.max_model_len
    return options


def measure_profile(options: MeasureOptions, progress: Progress = stderr_progress) -> Profile:
    """Measure every table of a profile on this machine (takes seconds to minutes)."""
    import torch

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    config = EngineConfig(**options.engine)
    load_before = os.getloadavg()[0]
    progress(f"loading the engine ({config.model or 'default model'}, dtype {config.dtype})")
    engine = LLMEngine(config)
    threads = config.num_threads or torch.get_num_threads()
    grid = QUICK_GRID if options.quick else DEFAULT_GRID
    timer = StepTimer(engine)
    timer.warm_up()
    prefill = timer.prefill_grid(grid, progress)
    decode = timer.decode_grid(grid, progress)
    layout = engine.layout
    transfer = _transfer(engine, options, progress)
    progress("router decision and gRPC round trip")
    from capacity.measure_router import decision_times, rpc_round_trip_s

    decision = decision_times(queries=500 if options.quick else 2000, block_size=layout.block_size)
    rpc_s = rpc_round_trip_s(100 if options.quick else 300)
    progress(
        f"router decision {decision.median_s * 1e6:.0f} us (p99 {decision.p99_s * 1e6:.0f}), "
        f"rpc {rpc_s * 1e3:.2f} ms"
    )
    profile = Profile(
        hardware=hardware_name(config.device, threads),
        model=engine.model_config.name,
        dtype=engine.config.dtype,
        engine=_engine_options(engine),
        kv_bytes_per_token=layout.bytes_per_token,
        num_kv_blocks=layout.num_blocks,
        block_size=layout.block_size,
        prefill=prefill,
        decode=decode,
        transfer=transfer,
        router_decision_s=decision.median_s,
        router_decision_p99_s=decision.p99_s,
        overheads={"rpc_s": rpc_s},
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        notes=(
            f"measured by `pdserve profile{' --quick' if options.quick else ''}` on "
            f"{platform.node() or 'this host'} ({os.cpu_count()} CPUs); medians of "
            f"{grid.repeats} rounds per step point; 1-min load average "
            f"{load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
            "(a busy machine inflates step times: profile on a quiet one)"
        ),
    )
    if not options.e2e:
        return profile
    del engine, timer  # free the engine's memory before the stack's workers load theirs
    return with_e2e_overheads(profile, options.engine.get("model"), options.quick, progress)


def with_e2e_overheads(
    profile: Profile, model: str | None, quick: bool, progress: Progress = stderr_progress
) -> Profile:
    """``profile`` with its end-to-end overheads (re-)measured on real stacks running its
    engine options (capacity/measure_e2e.py); the step tables are kept as they are."""
    from capacity.measure_e2e import e2e_overheads

    progress("end-to-end overheads on real 1P+1D and colocated stacks")
    extra = e2e_overheads(profile, {"model": model}, requests=3 if quick else 8)
    progress(", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in extra.items()))
    return replace(profile, overheads={**profile.overheads, **extra})


def _transfer(engine: Any, options: MeasureOptions, progress: Progress) -> TransferFit:
    """The KV transfer fit over a real sender/receiver pair of this engine's geometry."""
    from capacity.measure_transfer import Geometry, transfer_points

    layout = engine.layout
    sizes = QUICK_TRANSFER_BLOCKS if options.quick else DEFAULT_TRANSFER_BLOCKS
    geometry = Geometry(
        layout.num_layers,
        layout.num_kv_heads,
        layout.head_dim,
        layout.block_size,
        layout.dtype,
        layout.order,
    )
    progress(f"KV transfer over a real gloo pair: {sizes} blocks")
    points = transfer_points(geometry, sizes, 3 if options.quick else 5, engine.model_config.name)
    fit = fit_transfer(points)
    progress(
        f"transfer: latency {fit.latency_s * 1e3:.2f} ms, "
        f"{fit.bandwidth_bytes_per_s / 1e9:.2f} GB/s"
    )
    return fit
