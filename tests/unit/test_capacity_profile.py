"""Profile validation, JSON round trip and the cost model's interpolation rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from capacity.cost_model import CostModel
from capacity.profile import Grid2D, Profile, ProfileError, TransferFit, fit_transfer
from capacity.published import HARDWARE, MODELS, Efficiency, decode_s, prefill_s, roofline_profile


def _profile(**overrides: object) -> Profile:
    fields: dict = dict(
        hardware="cpu: test",
        model="m",
        dtype="float32",
        engine={"block_size": 16},
        kv_bytes_per_token=100,
        num_kv_blocks=10,
        block_size=16,
        prefill=Grid2D("new_tokens", "cached_tokens", (16, 32), (0, 64), ((1.0, 2.0), (3.0, 5.0))),
        decode=Grid2D("batch_size", "total_context", (1, 4), (16, 64), ((0.1, 0.2), (0.3, 0.6))),
        transfer=TransferFit(0.001, 1e9),
        router_decision_s=1e-5,
    )
    fields.update(overrides)
    return Profile(**fields)


def test_round_trip(tmp_path) -> None:
    profile = _profile(overheads={"rpc_s": 0.002}, sources=("a paper",))
    path = tmp_path / "p.json"
    profile.save(path)
    assert Profile.load(path) == profile


def test_validation_names_the_field(tmp_path) -> None:
    with pytest.raises(ProfileError, match="strictly increasing"):
        Grid2D("new_tokens", "cached_tokens", (32, 16), (0,), ((1.0,), (2.0,)))
    with pytest.raises(ProfileError, match="kv_bytes_per_token"):
        _profile(kv_bytes_per_token=0)
    path = tmp_path / "bad.json"
    path.write_text('{"version": 1, "hardware": "x"}')
    with pytest.raises(ProfileError, match="missing field"):
        Profile.load(path)
    path.write_text('{"version": 9}')
    with pytest.raises(ProfileError, match="version"):
        Profile.load(path)


def test_interpolation_exact_monotone_and_extrapolated() -> None:
    cost = CostModel(_profile())
    assert cost.prefill_s(16, 0) == 1.0 and cost.prefill_s(32, 64) == 5.0
    assert cost.prefill_s(24, 32) == pytest.approx((1.0 + 2.0 + 3.0 + 5.0) / 4)
    assert cost.prefill_s(8, 0) == 1.0  # below the grid: floor
    assert cost.prefill_s(48, 0) == pytest.approx(5.0)  # last slope: 1 -> 3 per 16
    values = [cost.decode_step_s(b, 40) for b in range(1, 9)]
    assert values == sorted(values)
    assert cost.transfer_s(10**9) == pytest.approx(1.001)
    assert cost.kv_bytes(3) == 300 and cost.prefill_s(0, 0) == 0.0


def test_fit_transfer() -> None:
    fit = fit_transfer([(0, 0.001), (10**9, 1.001), (2 * 10**9, 2.001)])
    assert fit.latency_s == pytest.approx(0.001) and fit.bandwidth_bytes_per_s == pytest.approx(1e9)


# -- shipped profiles and the roofline generator -----------------------------------------

PROFILES = Path(__file__).resolve().parents[2] / "capacity" / "profiles"


def test_shipped_profiles_load_and_are_sane() -> None:
    paths = sorted(PROFILES.glob("*.json"))
    assert len(paths) >= 2  # the GPU roofline one and the measured CPU one
    for path in paths:
        profile = Profile.load(path)
        cost = CostModel(profile)
        assert profile.hardware and profile.model and profile.num_kv_blocks > 0
        assert cost.prefill_s(1024, 0) > cost.prefill_s(16, 0) > 0, path.name
        assert cost.decode_step_s(32, 8192) >= cost.decode_step_s(1, 1024) > 0, path.name
        assert cost.transfer_s(10**8) > cost.transfer_s(10**4) > 0, path.name
        if not profile.hardware.startswith("cpu"):
            assert profile.sources, f"{path.name}: a hand-written profile names its sources"


def test_shipped_gpu_profile_is_the_generated_one() -> None:
    shipped = Profile.load(PROFILES / "h100-llama-3.1-8b-bf16.json")
    assert shipped == roofline_profile("h100-sxm", "llama-3.1-8b")


def test_roofline_regimes() -> None:
    """Decode at batch 1 streams the weights (memory-bound); a long prefill is
    compute-bound; cached context costs attention; the numbers match the formulas."""
    hw, model, eff = HARDWARE["h100-sxm"], MODELS["llama-3.1-8b"], Efficiency()
    assert model.kv_bytes_per_token == 128 * 1024
    weights_s = model.weight_bytes / (hw.hbm_bytes_per_s * eff.memory)
    one = decode_s(1, 1024, hw, model, eff)
    assert one == pytest.approx(
        weights_s
        + 1024 * model.kv_bytes_per_token / (hw.hbm_bytes_per_s * eff.memory)
        + eff.step_overhead_s
    )
    assert 5e-3 < one < 10e-3  # ~7 ms per token for an 8B bf16 model on one H100
    # Memory-bound decode: 8x the batch at the same context costs about the same.
    assert decode_s(8, 1024, hw, model, eff) == pytest.approx(one)
    linear_flops = 2 * (model.params - model.embedding_params) * 8192
    long_prefill = prefill_s(8192, 0, hw, model, eff)
    assert long_prefill > linear_flops / (hw.peak_flops * eff.compute)  # compute-bound
    assert prefill_s(2048, 16384, hw, model, eff) > prefill_s(2048, 0, hw, model, eff)
    profile = roofline_profile("h100-sxm", "llama-3.1-8b")
    assert profile.kv_bytes_per_token == model.kv_bytes_per_token
    assert 20_000 < profile.num_kv_blocks < 30_000  # ~57 GB of KV in 2 MiB blocks
    assert any("nvidia.com" in s for s in profile.sources)


def _probe_records(cost: CostModel, hops: int, excess, gaps=(0.03, 0.03, 0.03)) -> dict:
    """Records of the three probes whose TTFT is the tables + router + hops x rpc + excess."""
    fixed = cost.router_decision_s() + hops * cost.overhead_s("rpc_s")
    probes = {"short": (16, 0), "long": (32, 0), "cached": (32, 16)}
    out = {}
    for name, (prompt, cached) in probes.items():
        new = prompt - cached
        ttft = cost.prefill_s(new, cached) + fixed + excess(new, prompt)
        itls = [cost.decode_step_s(1, prompt + k + 1) + g for k, g in enumerate(gaps)]
        record = {"ttft_s": ttft, "itls_s": itls, "prompt_tokens": prompt, "cached_tokens": cached}
        out[name] = [record, dict(record)]
    return out


def test_e2e_overheads_fit_the_probes_and_the_cost_model_charges_them() -> None:
    """The fit recovers a known excess (remote: fixed + per new token + per shipped token;
    local: fixed + per new token), from the raw tables (idempotent), and the cost model
    charges each where the module says."""
    from dataclasses import replace

    from capacity.measure_e2e import overheads_from_records

    profile = _profile(overheads={"rpc_s": 0.001})
    cost = CostModel(profile)
    remote = _probe_records(cost, 2, lambda n, p: 0.2 + 0.01 * n + 0.005 * p, (0.08, 0.03, 0.03))
    local = _probe_records(cost, 1, lambda n, p: 0.1 + 0.02 * n)
    cached = remote["cached"][0]  # the cached probe again, beside a busy decode worker
    join = cost.decode_step_s(2, 64) + 0.03 + 0.07
    remote["contended"] = [{**cached, "ttft_s": cached["ttft_s"] + 0.04, "itls_s": [join]}]
    out = overheads_from_records(profile, remote, local)
    expected = {
        "prefill_step_overhead_s": 0.2,
        "prefill_token_overhead_s": 0.01,
        "handoff_token_overhead_s": 0.005,
        "local_prefill_step_overhead_s": 0.1,
        "local_prefill_token_overhead_s": 0.02,
        "decode_step_overhead_s": 0.03,
        "first_decode_step_overhead_s": 0.05,  # the first gap's 0.08, less the 0.03 of all
        "busy_decode_handoff_s": 0.04,
        "join_running_batch_overhead_s": 0.07,  # beyond a charged decode(2, ...) step
    }
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-9), key
    padded = replace(profile, overheads={**profile.overheads, **out})
    assert overheads_from_records(padded, remote, local) == out  # idempotent
    charged = CostModel(padded)
    table = cost.prefill_s(16, 0)
    assert charged.prefill_s(16, 0) == pytest.approx(table + 0.2 + 0.16)
    assert charged.prefill_s(16, 0, local=True) == pytest.approx(table + 0.1 + 0.32)
    assert charged.handoff_s(32) == pytest.approx(0.16)
    assert charged.first_decode_extra_s() == pytest.approx(0.05)
    assert charged.first_decode_extra_s(into_running_batch=True) == pytest.approx(0.07)
    assert charged.busy_decode_handoff_s() == pytest.approx(0.04)
    assert charged.decode_step_s(1, 16) == pytest.approx(0.1 + 0.03)
    assert charged.prefill_s(0, 0) == 0.0 and charged.decode_step_s(0, 0) == 0.0


def test_e2e_fit_drops_a_negative_term_and_clamps() -> None:
    """An excess that falls with the prompt length has no per-token hand-off: that term is
    dropped and the rest refitted; an excess below zero everywhere clamps to nothing."""
    from capacity.measure_e2e import ProbePoint, fit_excess, overheads_from_records

    points = [ProbePoint(16, 16, 0.30), ProbePoint(32, 32, 0.28), ProbePoint(16, 32, 0.29)]
    fixed, per_new, per_prompt = fit_excess(points, shipped=True)
    assert per_prompt == 0.0 and per_new == 0.0 and fixed == pytest.approx(0.29)
    profile = _profile()
    cost = CostModel(profile)
    remote = _probe_records(cost, 2, lambda n, p: -0.5, gaps=())
    out = overheads_from_records(profile, remote)
    assert out["prefill_step_overhead_s"] == 0.0 and out["handoff_token_overhead_s"] == 0.0
    assert "decode_step_overhead_s" not in out and "local_prefill_step_overhead_s" not in out
    assert CostModel(profile).handoff_s(100) == 0.0  # absent: the engine alone


def test_a_mixed_step_pays_the_worker_overhead_once() -> None:
    extras = {"prefill_step_overhead_s": 0.3, "decode_step_overhead_s": 0.05}
    cost = CostModel(_profile(overheads=extras))
    prefill, decode = cost.prefill_s(16, 0), cost.decode_step_s(1, 16)
    assert prefill == pytest.approx(1.0 + 0.3) and decode == pytest.approx(0.1 + 0.05)
    assert cost.mixed_step_s(16, 0, 1, 16) == pytest.approx(1.0 + 0.1 + 0.3)
    assert cost.mixed_step_s(16, 0, 0, 0) == pytest.approx(prefill)  # nothing decoding
    assert cost.mixed_step_s(0, 0, 1, 16) == pytest.approx(decode)  # nothing to prefill
    local = {**extras, "local_prefill_step_overhead_s": 0.1, "local_prefill_token_overhead_s": 0.01}
    split = CostModel(_profile(overheads=local))  # local prefill: its own pair, fixed once
    assert split.mixed_step_s(16, 0, 1, 16) == pytest.approx(1.0 + 0.1 + 0.16 + 0.1)
    assert split.mixed_step_s(16, 0, 0, 0, local=False) == pytest.approx(1.0 + 0.3)
