"""WorkerInfo / WorkerLoad / BlockGeometry: JSON round trips and strict parsing."""

from __future__ import annotations

import json

import pytest

from common.worker_info import BlockGeometry, WorkerInfo, WorkerLoad, WorkerRole


def geometry(**overrides: object) -> BlockGeometry:
    fields: dict[str, object] = dict(
        model="smollm2-135m",
        dtype="float32",
        block_size=16,
        num_layers=30,
        num_kv_heads=3,
        head_dim=64,
        num_blocks=512,
    )
    fields.update(overrides)
    return BlockGeometry(**fields)  # type: ignore[arg-type]


def info(**overrides: object) -> WorkerInfo:
    fields: dict[str, object] = dict(
        worker_id="prefill-0",
        role=WorkerRole.PREFILL,
        pool="default",
        model="smollm2-135m",
        grpc_address="127.0.0.1:50051",
        kv_address="127.0.0.1:29500",
        geometry=geometry(),
        started_at=1_700_000_000.5,
    )
    fields.update(overrides)
    return WorkerInfo(**fields)  # type: ignore[arg-type]


def load(**overrides: object) -> WorkerLoad:
    fields: dict[str, object] = dict(
        worker_id="decode-1",
        queued=2,
        running=7,
        free_blocks=100,
        used_blocks=300,
        cached_blocks=112,
        ttft_ms_recent=41.5,
        itl_ms_recent=None,
        queued_prefill_tokens=384,
        draining=True,
        updated_at=1_700_000_001.25,
    )
    fields.update(overrides)
    return WorkerLoad(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("role", list(WorkerRole))
def test_worker_info_round_trip(role: WorkerRole) -> None:
    original = info(role=role)
    parsed = WorkerInfo.from_json(original.to_json())
    assert parsed == original
    assert parsed.role is role


def test_worker_info_without_kv_address_round_trips() -> None:
    original = info(kv_address=None, role=WorkerRole.COLOCATED)
    assert WorkerInfo.from_json(original.to_json().encode()) == original


def test_worker_info_json_is_plain() -> None:
    data = json.loads(info().to_json())
    assert data["role"] == "prefill"
    assert data["geometry"]["num_kv_heads"] == 3


def test_worker_load_round_trip() -> None:
    original = load()
    assert WorkerLoad.from_json(original.to_json()) == original
    idle = WorkerLoad("w", 0, 0, 10, 0, 0)
    assert WorkerLoad.from_json(idle.to_json()) == idle
    assert idle.ttft_ms_recent is None and not idle.draining


def test_geometry_round_trip_and_block_bytes() -> None:
    g = geometry()
    assert BlockGeometry.from_json(g.to_json()) == g
    # Default model, fp32: 45 KiB per token (DESIGN.md), 16 tokens per block.
    assert g.block_bytes == 45 * 1024 * 16
    assert g.mismatch(geometry(num_blocks=4)) is None  # capacity may differ
    assert g.mismatch(geometry(block_size=32)) == "block_size: we 16, peer 32"
    assert g.mismatch(geometry(dtype="float16")) == "dtype: we 'float32', peer 'float16'"
    assert g.mismatch(geometry(order="page_first"), "receiver", "sender") == (
        "order: receiver 'layer_first', sender 'page_first'"
    )
    legacy = {k: v for k, v in geometry(order="layer_first").to_dict().items() if k != "order"}
    assert BlockGeometry.from_dict(legacy) == geometry(order="layer_first")


def test_unknown_role_is_rejected() -> None:
    data = json.loads(info().to_json())
    data["role"] = "router"
    with pytest.raises(ValueError, match="unknown worker role 'router'"):
        WorkerInfo.from_json(json.dumps(data))
    with pytest.raises(ValueError, match="unknown worker role"):
        info(role="PREFILL")


def test_plain_string_role_is_coerced() -> None:
    assert info(role="decode").role is WorkerRole.DECODE


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("pool"), "missing field 'pool'"),
        (lambda d: d["geometry"].pop("head_dim"), "missing field 'head_dim'"),
        (lambda d: d.update(grpc_address=5), "grpc_address: expected a string"),
        (lambda d: d["geometry"].update(block_size="16"), "block_size: expected an integer"),
        (lambda d: d["geometry"].update(block_size=True), "block_size: expected an integer"),
        (lambda d: d["geometry"].update(block_size=0), "block_size must be positive"),
        (lambda d: d["geometry"].update(dtype="int4"), "unknown KV dtype"),
        (lambda d: d.update(geometry=[1, 2]), "expected a JSON object"),
        (lambda d: d.update(worker_id=""), "worker_id must be non-empty"),
    ],
)
def test_bad_worker_info_is_rejected(mutate, message: str) -> None:
    data = json.loads(info().to_json())
    mutate(data)
    with pytest.raises(ValueError, match=message):
        WorkerInfo.from_json(json.dumps(data))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("draining"), "missing field 'draining'"),
        (lambda d: d.update(draining="no"), "draining: expected a boolean"),
        (lambda d: d.update(free_blocks=-1), "free_blocks must be >= 0"),
        (lambda d: d.update(running=1.5), "running: expected an integer"),
        (lambda d: d.update(ttft_ms_recent="fast"), "ttft_ms_recent: expected a number"),
    ],
)
def test_bad_worker_load_is_rejected(mutate, message: str) -> None:
    data = json.loads(load().to_json())
    mutate(data)
    with pytest.raises(ValueError, match=message):
        WorkerLoad.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["", "not json", "[]", "null", b"\xff"])
def test_non_object_json_is_rejected(text: str | bytes) -> None:
    with pytest.raises(ValueError):
        WorkerInfo.from_json(text)
    with pytest.raises(ValueError):
        WorkerLoad.from_json(text)


def test_unknown_fields_are_ignored_for_rolling_upgrades() -> None:
    data = json.loads(load().to_json())
    data["gpu_util"] = 0.9
    assert WorkerLoad.from_json(json.dumps(data)) == load()


def test_integer_timestamps_parse_as_float() -> None:
    data = json.loads(load().to_json())
    data["updated_at"] = 1_700_000_000
    parsed = WorkerLoad.from_json(json.dumps(data))
    assert isinstance(parsed.updated_at, float)
