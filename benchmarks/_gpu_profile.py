"""The GPU profile the capacity benchmarks run on: the shipped one, or a roofline stand-in.

capacity/profiles/h100-llama-3.1-8b-bf16.json (hand-written from published figures by
``pdserve profile``'s owner) is used when present. Without it, :func:`roofline_h100_8b`
builds the same shape from first principles, so the benchmarks still run: Llama-3.1-8B in
bf16 (16 GB of weights, 16 GFLOP per token, 128 KiB of KV per token) on an H100 SXM
(3.0 TB/s of HBM and 600 TFLOP/s achieved of 989 peak, i.e. ~60% MFU):

- prefill step: 3 ms fixed + linear FLOPs + attention FLOPs over (cached + new/2) context;
- decode step: 2 ms fixed + max(weights read, batch FLOPs) + every context token's KV read;
- transfer: 0.5 ms + bytes / 40 GB/s (a 400 Gb/s RDMA NIC per GPU).
"""

from __future__ import annotations

from pathlib import Path

from capacity.profile import Grid2D, Profile, TransferFit

SHIPPED = Path(__file__).resolve().parents[1] / "capacity/profiles/h100-llama-3.1-8b-bf16.json"
_FLOPS, _HBM = 600e12, 3.0e12
_PARAMS_FLOPS = 16e9  # 2 × 8B per token
_ATTN_FLOPS = 4 * 4096 * 32  # per (query token, context token): QK and PV, all layers
_KV_BYTES = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads, head_dim 128, bf16


def gpu_profile() -> tuple[Profile, str]:
    """The shipped H100 profile if it exists, else the roofline one; and which it is."""
    if SHIPPED.exists():
        return Profile.load(SHIPPED), str(SHIPPED.relative_to(SHIPPED.parents[2]))
    return roofline_h100_8b(), "roofline_h100_8b (benchmarks/_gpu_profile.py)"


def _prefill_s(new: int, cached: int) -> float:
    return 0.003 + new * _PARAMS_FLOPS / _FLOPS + new * (cached + new / 2) * _ATTN_FLOPS / _FLOPS


def _decode_s(batch: int, context: int) -> float:
    weights = max(16e9 / _HBM, batch * _PARAMS_FLOPS / _FLOPS)
    return 0.002 + weights + context * _KV_BYTES / _HBM


def roofline_h100_8b() -> Profile:
    new = (16, 128, 512, 1024, 2048, 4096, 8192, 16384)
    cached = (0, 1024, 4096, 16384, 65536)
    batch = (1, 8, 32, 64, 128, 256, 512)
    context = (0, 16384, 65536, 262144, 1048576)
    return Profile(
        hardware="NVIDIA H100 SXM 80GB (roofline estimate)",
        model="meta-llama/Llama-3.1-8B-Instruct",
        dtype="bfloat16",
        engine={"block_size": 16, "max_num_batched_tokens": 8192, "max_num_seqs": 256},
        kv_bytes_per_token=_KV_BYTES,
        num_kv_blocks=28_000,  # ~57 GB of KV after 16 GB of weights and activations
        block_size=16,
        prefill=Grid2D(
            "new_tokens",
            "cached_tokens",
            new,
            cached,
            tuple(tuple(_prefill_s(n, c) for c in cached) for n in new),
        ),
        decode=Grid2D(
            "batch_size",
            "total_context",
            batch,
            context,
            tuple(tuple(_decode_s(b, c) for c in context) for b in batch),
        ),
        transfer=TransferFit(0.0005, 40e9),
        router_decision_s=50e-6,
        created="synthetic",
        sources=("roofline: 600 TFLOP/s bf16 achieved, 3.0 TB/s HBM (H100 SXM datasheet)",),
    )
