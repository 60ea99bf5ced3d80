"""``dtype: auto``: bf16 where the device multiplies it natively, else fp32."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.dtype import cpu_has_native_bf16, resolve_dtype

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse2 avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
flags\t\t: fpu vme sse2 avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""
AMX_ONLY = "flags\t: fpu avx2 amx_tile amx_bf16\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu vme sse2 avx2 avx512f avx512bw avx512_vnni\n"
# A flag that only *contains* the name, and the name outside a flags line, do not count.
LOOKALIKES = (
    "flags\t: fpu avx512_bf16x amx_bf16_lite\nbugs\t: avx512_bf16\nmodel name\t: amx_bf16\n"
)


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [(SAPPHIRE_RAPIDS, True), (AMX_ONLY, True), (SKYLAKE, False), (LOOKALIKES, False), ("", False)],
)
def test_detector_reads_flags_lines(cpuinfo: str, native: bool) -> None:
    assert cpu_has_native_bf16(cpuinfo) is native


def test_auto_resolves_per_device() -> None:
    assert resolve_dtype("auto", "cpu", SAPPHIRE_RAPIDS) == "bfloat16"
    assert resolve_dtype("auto", "cpu", SKYLAKE) == "float32"
    assert resolve_dtype("auto", "cuda", SKYLAKE) == "bfloat16"
    assert resolve_dtype("auto", "cuda:1", "") == "bfloat16"


def test_explicit_dtype_is_kept() -> None:
    for name in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(name, "cpu", SKYLAKE) == name
    assert resolve_dtype("float32", "cuda", SAPPHIRE_RAPIDS) == "float32"


def test_auto_is_the_default_and_unknown_names_are_refused() -> None:
    assert EngineConfig().dtype == "auto"
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="bf16")
