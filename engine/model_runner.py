"""The only code that touches the device: builds a step's tensors, runs the model, samples.

A step's chunks are laid out decode rows first (one token each), then prefill chunks, so
attention can treat the decode rows as padded batches. Decode rows are sorted by context
length and cut into groups whose padding stays bounded, so one long context does not make
every row of the step pay for its length. Logits are computed only for the
chunks that end on the last known token of their sequence (``samples``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, DecodeBatch, PrefillSpan
from engine.kv_cache import KVCache
from engine.model import DecoderModel, LayerHook
from engine.sampler import Sampler
from engine.scheduler import ScheduledChunk


@dataclass(slots=True)
class StepBatch:
    input_ids: torch.Tensor  # (num_tokens,)
    positions: torch.Tensor  # (num_tokens,)
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # rows of the batch whose logits are sampled
    samplers: list[ScheduledChunk]  # the chunks those rows belong to, same order


class ModelRunner:
    def __init__(self, model: DecoderModel, kv_cache: KVCache, sampler: Sampler) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.block_size = kv_cache.layout.block_size
        self.row_stride = kv_cache.layout.row_stride  # slot = block * row_stride + offset
        self.device = kv_cache.device

    @torch.inference_mode()
    def execute(
        self, chunks: list[ScheduledChunk], after_layer: LayerHook | None = None
    ) -> dict[str, int]:
        """Compute the chunks' KV into the cache; return the sampled token per request."""
        batch = self.prepare(chunks)
        hidden = self.model(
            batch.input_ids, batch.positions, self.kv_cache, batch.meta, after_layer
        )
        if not batch.samplers:
            return {}
        logits = self.model.compute_logits(hidden[batch.sample_rows])
        ids = [chunk.seq.request_id for chunk in batch.samplers]
        tokens = self.sampler.sample(logits, ids, [chunk.seq.params for chunk in batch.samplers])
        return dict(zip(ids, tokens, strict=True))

    def prepare(self, chunks: list[ScheduledChunk]) -> StepBatch:
        decodes = sorted((c for c in chunks if c.num_tokens == 1), key=lambda c: c.start)
        prefills = [c for c in chunks if c.num_tokens > 1]
        ordered = decodes + prefills
        input_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        for chunk in ordered:
            input_ids.extend(chunk.seq.all_token_ids[chunk.start : chunk.start + chunk.num_tokens])
            positions.extend(range(chunk.start, chunk.start + chunk.num_tokens))
            if chunk.samples:
                sample_rows.append(len(input_ids) - 1)
        position_tensor = self._tensor(positions)
        meta = AttentionMetadata(
            slot_mapping=self._slot_mapping(ordered, position_tensor),
            decode=self._decode_batches(decodes),
            prefills=self._prefill_spans(prefills, start_row=len(decodes)),
        )
        return StepBatch(
            input_ids=self._tensor(input_ids),
            positions=position_tensor,
            meta=meta,
            sample_rows=self._tensor(sample_rows),
            samplers=[chunk for chunk in ordered if chunk.samples],
        )

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _block_tables(self, chunks: list[ScheduledChunk], num_positions: int) -> torch.Tensor:
        width = -(-num_positions // self.block_size)
        rows = [
            c.seq.block_table[:width] + [0] * (width - len(c.seq.block_table[:width]))
            for c in chunks
        ]
        return self._tensor(rows).view(len(chunks), width)

    def _slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of ``positions`` (broadcast) through a ``(rows, width)`` block table."""
        blocks = block_table.gather(
            1, (positions // self.block_size).expand(block_table.shape[0], -1)
        )
        return blocks * self.row_stride + positions % self.block_size

    def _slot_mapping(self, chunks: list[ScheduledChunk], positions: torch.Tensor) -> torch.Tensor:
        per_chunk = []
        offset = 0
        for chunk in chunks:
            pos = positions[offset : offset + chunk.num_tokens]
            table = self._block_tables([chunk], chunk.start + chunk.num_tokens)
            per_chunk.append(self._slots(table, pos.unsqueeze(0))[0])
            offset += chunk.num_tokens
        return torch.cat(per_chunk)

    def _decode_batches(self, decodes: list[ScheduledChunk]) -> list[DecodeBatch]:
        """Groups of rows (sorted by context) whose longest context is at most twice the
        shortest (plus a block), so padding at most doubles a group's attention work."""
        batches: list[DecodeBatch] = []
        start = 0
        for end in range(1, len(decodes) + 1):
            if (
                end == len(decodes)
                or decodes[end].start > 2 * decodes[start].start + self.block_size
            ):
                batches.append(self._decode_batch(decodes[start:end], row_start=start))
                start = end
        return batches

    def _decode_batch(self, decodes: list[ScheduledChunk], row_start: int) -> DecodeBatch:
        context_lens = [c.start + 1 for c in decodes]
        longest = max(context_lens)
        tables = self._block_tables(decodes, longest)
        span = torch.arange(longest, device=self.device).unsqueeze(0)
        lens = self._tensor(context_lens)
        return DecodeBatch(
            row_start=row_start,
            num_rows=len(decodes),
            slots=self._slots(tables, span),
            mask=(span < lens.unsqueeze(1)).view(len(decodes), 1, 1, longest),
            block_tables=tables.to(torch.int32),
            context_lens=lens.to(torch.int32),
        )

    def _prefill_spans(self, prefills: list[ScheduledChunk], start_row: int) -> list[PrefillSpan]:
        spans = []
        row = start_row
        for chunk in prefills:
            context = chunk.start + chunk.num_tokens
            slots = None
            if chunk.start > 0:
                table = self._block_tables([chunk], context)
                span = torch.arange(context, device=self.device).unsqueeze(0)
                slots = self._slots(table, span)[0]
            spans.append(PrefillSpan(row, chunk.num_tokens, context, slots))
            row += chunk.num_tokens
        return spans
