"""The only code that touches the device: builds a step's tensors, runs the model, samples.

A step's chunks are laid out decode rows first (one token each), then prefill chunks, so
attention can treat the decode rows as padded batches. Decode rows are sorted by context
length and cut into groups by engine/decode_groups.py (padded work against per-group
overhead), so one long context does not make every row of the step pay for its length.
Logits are computed only for the chunks that end on the last known token of their
sequence (``samples``), plus every prompt row of a request that asked for
``prompt_logprobs`` (engine/logprobs.py turns them, and the sampled rows that asked for
``logprobs``, into log-probs; ``last_logprobs`` holds the step's). Slots and block
tables are built in plain Python from the block tables the scheduler already holds: a few
hundred ints a step, cheaper than the dozens of tiny tensor ops it would take to compute
them on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.attention import AttentionMetadata, DecodeBatch, PrefillSpan
from engine.cuda_graphs import CudaGraphDecoder
from engine.decode_groups import group_by_context
from engine.kv_cache import KVCache
from engine.logprobs import prompt_logprobs, token_logprobs
from engine.model import DecoderModel, LayerHook
from engine.outputs import TokenLogprob
from engine.sampler import Sampler
from engine.scheduler import ScheduledChunk
from engine.speculative.verify import verify_chunks


@dataclass(slots=True)
class StepBatch:
    input_ids: torch.Tensor  # (num_tokens,)
    positions: torch.Tensor  # (num_tokens,)
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # rows of the batch whose logits are sampled
    samplers: list[ScheduledChunk]  # the chunks those rows belong to, same order
    # (chunk, its first row) in batch order: prompt_logprobs reads the chunk's rows
    chunk_rows: list[tuple[ScheduledChunk, int]] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self,
        model: DecoderModel,
        kv_cache: KVCache,
        sampler: Sampler,
        graphs: CudaGraphDecoder | None = None,
    ) -> None:
        self.model = model
        self.graphs = graphs  # captured decode steps (CUDA only), engine/cuda_graphs.py
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.block_size = kv_cache.layout.block_size
        self.row_stride = kv_cache.layout.row_stride  # slot = block * row_stride + offset
        self.device = kv_cache.device
        # Log-probs of the tokens sampled by the last execute(), for requests that asked.
        self.last_logprobs: dict[str, TokenLogprob] = {}

    @torch.inference_mode()
    def execute(
        self, chunks: list[ScheduledChunk], after_layer: LayerHook | None = None
    ) -> dict[str, int | list[int]]:
        """Compute the chunks' KV into the cache; return the sampled token per request
        (for a speculative verify chunk: the list of its accepted tokens)."""
        batch = self.prepare(chunks)
        if (
            self.graphs is not None
            and after_layer is None
            and self.graphs.fits(batch.input_ids, batch.meta)
        ):
            hidden = self.graphs.run(batch.input_ids, batch.positions, batch.meta)
        else:
            hidden = self.model(
                batch.input_ids, batch.positions, self.kv_cache, batch.meta, after_layer
            )
        self._prompt_logprobs(batch, hidden)
        self.last_logprobs = {}
        verified = [(c, row) for c, row in batch.chunk_rows if c.draft_token_ids]
        result: dict[str, int | list[int]] = dict(
            verify_chunks(verified, hidden, self.model.compute_logits, self.sampler)
        )
        if not batch.samplers:
            return result
        logits = self.model.compute_logits(hidden[batch.sample_rows])
        ids = [chunk.seq.request_id for chunk in batch.samplers]
        tokens = self.sampler.sample(logits, ids, [chunk.seq.params for chunk in batch.samplers])
        self._sampled_logprobs(batch.samplers, logits, tokens)
        result.update(zip(ids, tokens, strict=True))
        return result

    def _sampled_logprobs(
        self, samplers: list[ScheduledChunk], logits: torch.Tensor, tokens: list[int]
    ) -> None:
        """Log-probs (raw model, engine/logprobs.py) of the sampled rows that asked."""
        rows = [i for i, c in enumerate(samplers) if c.seq.params.logprobs is not None]
        if not rows:
            return
        found = token_logprobs(
            logits[self._tensor(rows)],
            [tokens[i] for i in rows],
            [samplers[i].seq.params.logprobs or 0 for i in rows],
        )
        self.last_logprobs = {
            samplers[i].seq.request_id: lp for i, lp in zip(rows, found, strict=True)
        }

    def _prompt_logprobs(self, batch: StepBatch, hidden: torch.Tensor) -> None:
        """Append the chunk's prompt log-probs to each sequence that asked for them.

        Row ``p`` predicts prompt token ``p + 1``; positions already recorded (a preempted
        sequence recomputing its prompt) are skipped, so chunked prefills fill the list once.
        """
        for chunk, first_row in batch.chunk_rows:
            seq = chunk.seq
            if not seq.params.prompt_logprobs:
                continue
            begin = max(chunk.start, len(seq.prompt_logprobs))
            end = min(chunk.start + chunk.num_tokens, seq.num_prompt_tokens - 1)
            if begin >= end:
                continue
            rows = hidden[first_row + begin - chunk.start : first_row + end - chunk.start]
            targets = seq.prompt_token_ids[begin + 1 : end + 1]
            seq.prompt_logprobs.extend(prompt_logprobs(rows, targets, self.model.compute_logits))

    def prepare(self, chunks: list[ScheduledChunk]) -> StepBatch:
        decodes = sorted((c for c in chunks if c.num_tokens == 1), key=lambda c: c.start)
        prefills = [c for c in chunks if c.num_tokens > 1]
        ordered = decodes + prefills
        input_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        chunk_rows: list[tuple[ScheduledChunk, int]] = []
        for chunk in ordered:
            chunk_rows.append((chunk, len(input_ids)))
            input_ids.extend(chunk.token_ids)  # a verify chunk's drafts included
            positions.extend(range(chunk.start, chunk.start + chunk.num_tokens))
            if chunk.samples and not chunk.draft_token_ids:
                sample_rows.append(len(input_ids) - 1)
        meta = AttentionMetadata(
            slot_mapping=self._slot_mapping(ordered),
            decode=self._decode_batches(decodes),
            prefills=self._prefill_spans(prefills, start_row=len(decodes)),
        )
        return StepBatch(
            input_ids=self._tensor(input_ids),
            positions=self._tensor(positions),
            meta=meta,
            sample_rows=self._tensor(sample_rows),
            samplers=[c for c in ordered if c.samples and not c.draft_token_ids],
            chunk_rows=chunk_rows,
        )

    def _tensor(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _slot_mapping(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        bs, stride = self.block_size, self.row_stride
        slots = []
        for chunk in chunks:
            table = chunk.seq.block_table
            slots.extend(
                table[pos // bs] * stride + pos % bs
                for pos in range(chunk.start, chunk.start + chunk.num_tokens)
            )
        return self._tensor(slots)

    def _padded_tables(self, chunks: list[ScheduledChunk], width: int) -> list[list[int]]:
        return [(table := c.seq.block_table[:width]) + [0] * (width - len(table)) for c in chunks]

    def _decode_batches(self, decodes: list[ScheduledChunk]) -> list[DecodeBatch]:
        """Decode rows (sorted by context) in the groups engine/decode_groups.py picks."""
        if not decodes:
            return []
        if self.device.type == "cuda":  # the Triton kernel walks each row's own length
            return [self._decode_batch(decodes, row_start=0)]
        bs = self.block_size
        padded = [-(-(c.start + 1) // bs) * bs for c in decodes]  # whole blocks are gathered
        return [
            self._decode_batch(decodes[start:end], row_start=start)
            for start, end in group_by_context(padded)
        ]

    def _decode_batch(self, decodes: list[ScheduledChunk], row_start: int) -> DecodeBatch:
        context_lens = [c.start + 1 for c in decodes]
        width = -(-max(context_lens) // self.block_size)
        tables = self._tensor(self._padded_tables(decodes, width))
        lens = self._tensor(context_lens)
        mask = None
        if self.device.type != "cuda":  # the Triton kernel masks by context_lens itself
            span = torch.arange(width * self.block_size, device=self.device)
            mask = (span < lens.unsqueeze(1)).view(len(decodes), 1, 1, -1)
        else:
            tables = tables.to(torch.int32)
        return DecodeBatch(
            row_start=row_start,
            num_rows=len(decodes),
            block_tables=tables,
            context_lens=lens.to(torch.int32),
            mask=mask,
        )

    def _prefill_spans(self, prefills: list[ScheduledChunk], start_row: int) -> list[PrefillSpan]:
        spans = []
        row = start_row
        for chunk in prefills:
            context = chunk.start + chunk.num_tokens
            table = None
            if chunk.start > 0:
                width = -(-context // self.block_size)
                table = self._tensor(chunk.seq.block_table[:width])
            spans.append(PrefillSpan(row, chunk.num_tokens, context, table))
            row += chunk.num_tokens
        return spans
