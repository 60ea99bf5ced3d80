"""Frames, chunk plans and packing of the KV transfer (no processes, no sockets)."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache import KVCache, KVLayout
from kv_transfer.errors import (
    ProtocolError,
    TransferAborted,
    TransferRejected,
    TransferTimeout,
)
from kv_transfer.packing import Staging, block_index, layer_block_bytes, pack, unpack
from kv_transfer.types import TransferMode
from kv_transfer.wire import (
    HEADER_BYTES,
    Header,
    Kind,
    Reason,
    error_reason,
    plan_chunks,
    reason_error,
    transfer_key,
)

LAYOUT = KVLayout(num_layers=5, num_kv_heads=2, head_dim=8, block_size=4, num_blocks=24)


def test_header_round_trip_and_magic() -> None:
    frame = torch.zeros(HEADER_BYTES + 16, dtype=torch.uint8)
    header = Header(Kind.BEGIN, transfer_key("req-1"), 7, 3, 12, 1, 4 << 20)
    header.write(frame)
    assert Header.read(frame) == header
    frame[0] ^= 0xFF
    with pytest.raises(ProtocolError, match="magic"):
        Header.read(frame)


def test_transfer_key_is_stable_63_bit_and_distinct() -> None:
    keys = {transfer_key(f"req-{i}") for i in range(1000)}
    assert len(keys) == 1000
    assert all(0 <= k < 2**63 for k in keys)
    assert transfer_key("abc") == transfer_key("abc")


@pytest.mark.parametrize("mode", list(TransferMode))
@pytest.mark.parametrize(
    ("num_blocks", "num_layers", "chunk_bytes"),
    [(1, 30, 1 << 20), (7, 5, 100), (64, 30, 4 << 20), (300, 3, 1000), (5, 1, 10**9)],
)
def test_plan_covers_every_layer_block_once_in_layer_order(
    mode: TransferMode, num_blocks: int, num_layers: int, chunk_bytes: int
) -> None:
    unit = 96  # bytes of one (layer, block)
    plan = plan_chunks(num_blocks, num_layers, unit, mode, chunk_bytes)
    seen = [
        (layer, block)
        for c in plan
        for layer in range(c.layer_start, c.layer_stop)
        for block in range(c.block_start, c.block_stop)
    ]
    assert sorted(seen) == [(la, b) for la in range(num_layers) for b in range(num_blocks)]
    assert [c.index for c in plan] == list(range(len(plan)))
    for chunk in plan:
        assert chunk.nbytes(unit) <= max(chunk_bytes, unit)
        if mode is TransferMode.LAYERWISE:
            assert chunk.layer_stop - chunk.layer_start == 1
    # layers complete monotonically and all of them by the end
    done = [c.layers_complete(num_blocks) for c in plan]
    assert done == sorted(done) and done[-1] == num_layers


def test_reason_mapping_round_trips_causes() -> None:
    assert error_reason(None) is Reason.OK
    assert error_reason(TransferTimeout("x")) is Reason.TIMEOUT
    assert error_reason(TransferAborted("x")) is Reason.ABORTED
    assert isinstance(reason_error(Reason.TIMEOUT, "t", "peer"), TransferTimeout)
    err = reason_error(Reason.ABORTED, "t", "receiver r")
    assert isinstance(err, TransferAborted) and err.by_peer and "receiver r" in str(err)
    assert isinstance(reason_error(Reason.UNKNOWN_TRANSFER, "t", "p"), TransferRejected)
    assert isinstance(reason_error(999, "t", "p"), TransferRejected)


@pytest.mark.parametrize("mode", list(TransferMode))
@pytest.mark.parametrize("chunk_bytes", [1, 700, 1 << 20])
def test_pack_unpack_lands_bit_exact_in_other_block_ids(
    mode: TransferMode, chunk_bytes: int
) -> None:
    torch.manual_seed(0)
    src, dst = KVCache(LAYOUT), KVCache(LAYOUT)
    src.tensor.normal_()
    dst.tensor.fill_(-7.0)
    src_ids = (3, 17, 0, 9, 22, 11, 5)
    dst_ids = (20, 1, 2, 14, 8, 23, 6)
    staging = Staging(torch.device("cpu"))
    lbb = layer_block_bytes(LAYOUT)
    plan = plan_chunks(len(src_ids), LAYOUT.num_layers, lbb, mode, chunk_bytes)
    s_idx = block_index(src_ids, src.device)
    d_idx = block_index(dst_ids, dst.device)
    for chunk in plan:
        frame = staging.frame(chunk.index % 2, chunk.nbytes(lbb))
        assert pack(src, s_idx, chunk, frame) == chunk.nbytes(lbb)
        unpack(dst, d_idx, chunk, frame)
    assert torch.equal(src.gather(s_idx), dst.gather(d_idx))
    untouched = [b for b in range(LAYOUT.num_blocks) if b not in dst_ids]
    assert bool((dst.gather(torch.tensor(untouched)) == -7.0).all())


def test_staging_reuses_and_grows_frames() -> None:
    staging = Staging(torch.device("cpu"))
    a = staging.frame(0, 100)
    b = staging.frame(0, 50)
    assert a.data_ptr() == b.data_ptr() and b.numel() == HEADER_BYTES + 50
    c = staging.frame(0, 1000)
    assert c.numel() == HEADER_BYTES + 1000
    assert staging.frame(1, 10).data_ptr() != c.data_ptr()


def test_layer_block_bytes_matches_default_model() -> None:
    smol = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, num_blocks=1)
    assert smol.bytes_per_token == 45 * 1024
    assert layer_block_bytes(smol) * 30 == smol.bytes_per_block
