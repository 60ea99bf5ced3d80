"""Captured decode steps on CUDA: one CUDA graph per batch-size bucket.

A decode step of a small model is hundreds of kernel launches of microseconds each; on a
GPU the launches, not the math, set the step time. A captured graph replays them all with
one launch. Only pure-decode steps are captured (prefill chunks vary in shape), and only
without a per-layer hook (layer-wise KV sends run host code between layers).

Lifecycle of a bucket (sizes 1, 2, 4, 8, then multiples of 16 up to max_num_seqs):
  first decode step of that size → static inputs filled from the step → one eager warm-up
  run (compiles the Triton kernel, settles the allocator) → capture → replay; every later
  step of a size that rounds up to this bucket copies its inputs in and replays.

Padding rows (bucket > rows) repeat row 0 exactly: same token, position, slot and block
table. They compute the same K/V as row 0 and write it to row 0's slot, so the duplicate
write is idempotent and no cache block other than the step's own is touched (there is no
scratch block to spare: the block manager owns every block). Their outputs are dropped.
The warm-up and capture runs are the same step, so their KV writes are idempotent too.

This path has not been run on a GPU yet (README, "GPU"); ``make test-gpu`` checks it
against eager decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, DecodeBatch
from engine.kv_cache import KVCache
from engine.model import DecoderModel


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, 16, 32, 48, ... up to max_num_seqs."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return [*sizes, max_num_seqs]


@dataclass(slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # (bucket, hidden_size), the graph's output buffer


class CudaGraphDecoder:
    """Owns the static input buffers and the captured graphs of one model runner."""

    def __init__(
        self, model: DecoderModel, kv_cache: KVCache, max_num_seqs: int, max_blocks: int
    ) -> None:
        if kv_cache.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA KV cache")
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = bucket_sizes(max_num_seqs)
        largest, device = self.buckets[-1], kv_cache.device
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(largest, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(largest, max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self._graphs: dict[int, _Captured] = {}
        self._pool: object | None = None  # one memory pool shared by every bucket's graph

    def fits(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> bool:
        """A pure-decode step (one group: the Triton kernel needs no padding) we can hold."""
        return (
            not meta.prefills
            and len(meta.decode) == 1
            and input_ids.shape[0] <= self.buckets[-1]
            and meta.decode[0].block_tables.shape[1] <= self.block_tables.shape[1]
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The step's final hidden states ``(rows, hidden)``, through the bucket's graph."""
        rows = input_ids.shape[0]
        bucket = next(size for size in self.buckets if size >= rows)
        self._fill(rows, bucket, input_ids, positions, meta)
        captured = self._graphs.get(bucket)
        if captured is None:
            captured = self._capture(bucket)
            self._graphs[bucket] = captured
        captured.graph.replay()
        return captured.hidden[:rows]

    def _fill(
        self,
        rows: int,
        bucket: int,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        decode = meta.decode[0]
        width = decode.block_tables.shape[1]
        pad = slice(rows, bucket)
        for static, real in (
            (self.input_ids, input_ids),
            (self.positions, positions),
            (self.slot_mapping, meta.slot_mapping),
            (self.context_lens, decode.context_lens),
        ):
            static[:rows].copy_(real)
            static[pad] = real[0]
        self.block_tables[:bucket].zero_()
        self.block_tables[:rows, :width].copy_(decode.block_tables)
        self.block_tables[pad, :width] = decode.block_tables[0]

    def _metadata(self, bucket: int) -> AttentionMetadata:
        batch = DecodeBatch(
            row_start=0,
            num_rows=bucket,
            block_tables=self.block_tables[:bucket],
            context_lens=self.context_lens[:bucket],
            mask=None,
        )
        return AttentionMetadata(self.slot_mapping[:bucket], [batch], [])

    def _forward(self, bucket: int) -> torch.Tensor:
        return self.model(
            self.input_ids[:bucket], self.positions[:bucket], self.kv_cache, self._metadata(bucket)
        )

    def _capture(self, bucket: int) -> _Captured:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(bucket)  # warm-up: Triton compiles, the allocator settles
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self._forward(bucket)
        self._pool = graph.pool()
        return _Captured(graph, hidden)
