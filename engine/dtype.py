"""Which dtype ``dtype: auto`` means on this device.

bf16 halves the bytes every decode step streams (weights and KV) and, where the hardware
multiplies bf16 natively, costs no extra compute: CUDA GPUs, and x86 CPUs with AVX512-BF16
or AMX (``avx512_bf16`` / ``amx_bf16`` in ``/proc/cpuinfo``). Elsewhere bf16 would be
emulated through fp32 and be slower than fp32 itself, so ``auto`` falls back to fp32.
The KV cache takes the model's dtype; both ends of a KV transfer resolve on their own
machine and the KV handshake refuses a mismatch.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

AUTO = "auto"
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_CPUINFO = Path("/proc/cpuinfo")


def cpu_has_native_bf16(cpuinfo: str) -> bool:
    """True if any ``flags`` line of a ``/proc/cpuinfo`` text names a bf16 instruction set."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and NATIVE_BF16_CPU_FLAGS & set(value.split()):
            return True
    return False


@functools.cache
def _this_cpu_has_native_bf16() -> bool:
    try:
        return cpu_has_native_bf16(_CPUINFO.read_text())
    except OSError:  # not Linux, or a sandbox without /proc: be safe
        return False


def resolve_dtype(requested: str, device: str, cpuinfo: str | None = None) -> str:
    """The concrete dtype name for ``requested`` on ``device`` ("cpu", "cuda", "cuda:1").

    Anything but ``auto`` is returned unchanged. ``cpuinfo`` overrides the host's
    ``/proc/cpuinfo`` text (tests).
    """
    if requested != AUTO:
        return requested
    if device.startswith("cuda"):
        resolved, why = "bfloat16", "CUDA computes bf16 natively"
    else:
        native = _this_cpu_has_native_bf16() if cpuinfo is None else cpu_has_native_bf16(cpuinfo)
        resolved, why = (
            ("bfloat16", "the CPU has AVX512-BF16/AMX")
            if native
            else ("float32", "the CPU lacks AVX512-BF16/AMX (bf16 would be emulated)")
        )
    log.info("dtype auto -> %s on %s: %s", resolved, device, why)
    return resolved
