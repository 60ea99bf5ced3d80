"""Profile validation, JSON round trip and the cost model's interpolation rules."""

from __future__ import annotations

import pytest

from capacity.cost_model import CostModel
from capacity.profile import Grid2D, Profile, ProfileError, TransferFit, fit_transfer


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
