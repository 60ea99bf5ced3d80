"""Roofline profiles from published hardware and model figures (no measurement).

``python -m capacity.published --hardware h100-sxm --model llama-3.1-8b --out FILE``
writes the shipped capacity/profiles/h100-llama-3.1-8b-bf16.json; the file is generated,
not hand-typed, and a unit test checks that the shipped copy matches this code.

The step-time model (one replica, one GPU, bf16 weights and KV):

    flops(prefill N new, C cached) = 2 * P_lin * N + 4 * L * Hq * d * N * (C + N / 2)
    bytes(prefill)                 = W + kv * (C + N)       (weights once, KV read + written)
    flops(decode B seqs, T context) = 2 * P_lin * B + 4 * L * Hq * d * T
    bytes(decode)                   = W + kv * T            (weights once, all KV read)
    seconds = max(flops / (peak_flops * compute_eff), bytes / (hbm_bw * memory_eff))
              + step_overhead_s

``P_lin`` is the parameters that multiply activations (all but the input embedding), ``W``
the weight bytes, ``kv`` the KV bytes per token, ``L`` layers, ``Hq`` query heads of dim
``d`` (attention is QK^T and PV, 2 flops per multiply-add each). The efficiency factors
and the per-step host overhead are assumptions (stated in ``sources``), not datasheet
figures: typical sustained fractions of peak for dense bf16 GEMMs and for HBM streaming.
KV transfer: one NIC per GPU at ``net_eff`` of its line rate plus a fixed latency.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from capacity.profile import Grid2D, Profile, TransferFit


@dataclass(frozen=True)
class Hardware:
    """Datasheet figures of one accelerator and its network link."""

    name: str
    peak_flops: float  # dense bf16, FLOP/s (no sparsity)
    hbm_bytes_per_s: float
    memory_bytes: int
    net_bytes_per_s: float  # per GPU, for KV transfer between nodes
    sources: tuple[str, ...]


@dataclass(frozen=True)
class Model:
    """Architecture figures of one model (from its config.json / model card)."""

    name: str
    params: int  # total
    embedding_params: int  # the input embedding (a lookup, no flops)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    bytes_per_value: int  # bf16 = 2
    sources: tuple[str, ...]

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_value

    @property
    def weight_bytes(self) -> int:
        return self.params * self.bytes_per_value


@dataclass(frozen=True)
class Efficiency:
    """Assumed sustained fractions of peak, and fixed costs."""

    compute: float = 0.55  # dense bf16 GEMM fraction of peak in prefill-sized batches
    memory: float = 0.75  # HBM streaming fraction reached by decode steps
    step_overhead_s: float = 0.5e-3  # host work per step (schedule, launch, sample)
    net: float = 0.8  # fraction of NIC line rate reached by KV transfers
    net_latency_s: float = 50e-6  # per transfer: handshake and first byte
    memory_utilization: float = 0.9  # share of GPU memory the engine may use
    activation_reserve_bytes: int = 2 * 2**30  # activations, CUDA graphs, workspace


HARDWARE = {
    "h100-sxm": Hardware(
        name="NVIDIA H100 SXM 80GB",
        peak_flops=989.4e12,
        hbm_bytes_per_s=3.35e12,
        memory_bytes=80 * 10**9,
        net_bytes_per_s=400e9 / 8,
        sources=(
            "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): BF16 Tensor Core 1,979 "
            "TFLOPS with sparsity, i.e. 989.4 TFLOPS dense; GPU memory 80 GB HBM3 at "
            "3.35 TB/s. https://www.nvidia.com/en-us/data-center/h100/",
            "NVIDIA ConnectX-7 (NDR InfiniBand) 400 Gb/s per port, one per GPU as in DGX "
            "H100. https://www.nvidia.com/en-us/networking/ethernet-adapters/",
        ),
    ),
    "h200-sxm": Hardware(
        name="NVIDIA H200 SXM 141GB",
        peak_flops=989.4e12,
        hbm_bytes_per_s=4.8e12,
        memory_bytes=141 * 10**9,
        net_bytes_per_s=400e9 / 8,
        sources=(
            "NVIDIA H200 datasheet: BF16 1,979 TFLOPS with sparsity (989.4 dense), "
            "141 GB HBM3e at 4.8 TB/s. https://www.nvidia.com/en-us/data-center/h200/",
        ),
    ),
    "a100-sxm": Hardware(
        name="NVIDIA A100 SXM 80GB",
        peak_flops=312e12,
        hbm_bytes_per_s=2.039e12,
        memory_bytes=80 * 10**9,
        net_bytes_per_s=200e9 / 8,
        sources=(
            "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense, 80 GB HBM2e at "
            "2,039 GB/s. https://www.nvidia.com/en-us/data-center/a100/",
        ),
    ),
}

MODELS = {
    "llama-3.1-8b": Model(
        name="meta-llama/Llama-3.1-8B-Instruct",
        params=8_030_261_248,
        embedding_params=128_256 * 4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        bytes_per_value=2,
        sources=(
            "Llama 3.1 8B: 8.03B parameters; config.json: 32 layers, hidden 4096, 32 "
            "attention heads, 8 KV heads (GQA), head_dim 128, vocab 128,256, untied "
            "lm_head. KV per token in bf16 = 32 x 8 x 128 x 2 (K,V) x 2 B = 128 KiB. "
            "https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct",
        ),
    ),
}

PREFILL_NEW = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
PREFILL_CACHED = (0, 1024, 4096, 16384, 65536)
DECODE_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DECODE_CONTEXT = (1024, 8192, 32768, 131072, 524288)
ENGINE = {"block_size": 16, "max_num_batched_tokens": 8192, "max_num_seqs": 256}
ROUTER_DECISION_S = 52e-6  # benchmarks/README.md, 1,000 + 1,000 workers: p50 52 us
ROUTER_DECISION_P99_S = 151e-6
RPC_S = 0.37e-3  # DESIGN.md: plain grpcio unary call on loopback
ASSUMPTIONS = (
    "Roofline step model (capacity/published.py): seconds = max(flops / (peak x "
    "{compute}), bytes / (HBM bandwidth x {memory})) + {overhead_ms} ms host work per step. "
    "Efficiency factors and the host overhead are assumptions, not measurements; vLLM's "
    "v0.6.0 profiling of Llama 3 8B on one H100 found CPU-side work (API server, "
    "scheduling) a large share of step time before its fixes, which is why a fixed "
    "per-step term is kept. https://blog.vllm.ai/2024/09/05/perf-update.html",
    "KV transfer: {net} of the NIC line rate + {latency_us} us per transfer (assumed).",
    "Router decision and RPC overhead: pdserve's own measurements on the 2-core dev VM "
    "(benchmarks/README.md router overhead, 1,000 + 1,000 workers: p50 52 us, p99 151 us; "
    "DESIGN.md: grpcio unary call 0.37 ms), CPU costs independent of the GPU.",
)


def _seconds(flops: float, num_bytes: float, hw: Hardware, eff: Efficiency) -> float:
    compute = flops / (hw.peak_flops * eff.compute)
    memory = num_bytes / (hw.hbm_bytes_per_s * eff.memory)
    return max(compute, memory) + eff.step_overhead_s


def prefill_s(new: int, cached: int, hw: Hardware, model: Model, eff: Efficiency) -> float:
    """One prefill step of ``new`` tokens attending ``cached`` earlier ones."""
    linear = model.params - model.embedding_params
    attention = 4 * model.num_layers * model.num_heads * model.head_dim * new * (cached + new / 2)
    num_bytes = model.weight_bytes + model.kv_bytes_per_token * (cached + new)
    return _seconds(2 * linear * new + attention, num_bytes, hw, eff)


def decode_s(batch: int, context: int, hw: Hardware, model: Model, eff: Efficiency) -> float:
    """One decode step of ``batch`` sequences holding ``context`` tokens in all."""
    linear = model.params - model.embedding_params
    attention = 4 * model.num_layers * model.num_heads * model.head_dim * context
    num_bytes = model.weight_bytes + model.kv_bytes_per_token * context
    return _seconds(2 * linear * batch + attention, num_bytes, hw, eff)


def roofline_profile(hardware: str, model: str, eff: Efficiency | None = None) -> Profile:
    """The roofline profile of one catalogued accelerator and model."""
    hw, spec, eff = HARDWARE[hardware], MODELS[model], eff or Efficiency()
    prefill = tuple(
        tuple(prefill_s(n, c, hw, spec, eff) for c in PREFILL_CACHED) for n in PREFILL_NEW
    )
    decode = tuple(
        tuple(decode_s(b, t, hw, spec, eff) for t in DECODE_CONTEXT) for b in DECODE_BATCH
    )
    usable = hw.memory_bytes * eff.memory_utilization - spec.weight_bytes
    block_bytes = spec.kv_bytes_per_token * ENGINE["block_size"]
    num_blocks = int((usable - eff.activation_reserve_bytes) // block_bytes)
    assumptions = tuple(
        text.format(
            compute=eff.compute,
            memory=eff.memory,
            overhead_ms=eff.step_overhead_s * 1e3,
            net=eff.net,
            latency_us=eff.net_latency_s * 1e6,
        )
        for text in ASSUMPTIONS
    )
    return Profile(
        hardware=hw.name,
        model=spec.name,
        dtype="bfloat16",
        engine=dict(ENGINE),
        kv_bytes_per_token=spec.kv_bytes_per_token,
        num_kv_blocks=num_blocks,
        block_size=ENGINE["block_size"],
        prefill=Grid2D("new_tokens", "cached_tokens", PREFILL_NEW, PREFILL_CACHED, prefill),
        decode=Grid2D("batch_size", "total_context", DECODE_BATCH, DECODE_CONTEXT, decode),
        transfer=TransferFit(eff.net_latency_s, hw.net_bytes_per_s * eff.net),
        router_decision_s=ROUTER_DECISION_S,
        router_decision_p99_s=ROUTER_DECISION_P99_S,
        overheads={"rpc_s": RPC_S},
        created="generated by capacity/published.py (roofline, not measured)",
        sources=hw.sources + spec.sources + assumptions,
        notes=(
            f"KV blocks: {eff.memory_utilization} x memory - bf16 weights - "
            f"{eff.activation_reserve_bytes / 2**30:.0f} GiB reserve, in {ENGINE['block_size']}"
            "-token blocks; one GPU per replica (no tensor parallelism)"
        ),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hardware", choices=sorted(HARDWARE), default="h100-sxm")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-3.1-8b")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    roofline_profile(args.hardware, args.model).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
