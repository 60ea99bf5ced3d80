"""The step-wise engine a server loop drives: add requests, step, abort.

For disaggregation the engine also takes requests whose prompt KV arrives from elsewhere
(``reserve_blocks`` → the KV lands → ``add_prefilled``) and keeps a prefill-only
request's blocks after it finishes (``hold_blocks=True`` → send them → ``release``).

One step is three calls — ``scheduler.schedule()``, ``runner.execute()``,
``scheduler.update_from_output()`` — and returns the tokens each request gained. The
engine is single-threaded; a server calls it from one loop and feeds results to streams.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import replace

import torch

from common import env
from common.kv_events import KVEvent
from common.sampling import SamplingParams
from common.worker_info import BlockGeometry
from engine import kv_quant
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.cuda_graphs import CudaGraphDecoder
from engine.dtype import resolve_dtype
from engine.kv_cache import KVCache, KVLayout, torch_dtype
from engine.model import LayerHook, load_model
from engine.model_config import ModelConfig, load_model_config
from engine.model_loader import ModelLoadError, resolve_model
from engine.model_runner import ModelRunner
from engine.outputs import StepOutput, TokenLogprob
from engine.sampler import Sampler
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from engine.speculative import SpeculativeStats
from engine.speculative.build import build_speculator
from engine.speculative.draft_load import DraftTarget

StepLayerHook = Callable[[int, SchedulerOutput], None]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        env.apply_offline_defaults()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        # Resolve "auto" once, here, so the model, the KV cache and the geometry that KV
        # peers and the router see all name the same concrete dtype.
        config = replace(config, dtype=resolve_dtype(config.dtype, config.device))
        self.config = config
        source = resolve_model(config.model)
        self.model_config: ModelConfig = load_model_config(source.path, source.name)
        self.max_model_len = _max_model_len(config, self.model_config)
        kv_quant.check_supported(config.kv_cache_dtype, config.device)
        self.layout = _kv_layout(config, self.model_config, self.max_model_len)
        device = torch.device(config.device)
        self.model = load_model(
            self.model_config,
            source.path,
            self.max_model_len,
            torch_dtype(config.dtype),
            device,
            config.quantization,
        )
        self.tokenizer = _load_tokenizer(source.path)
        self.kv_cache = KVCache(self.layout, device)
        self.block_manager = BlockManager(
            self.layout.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.speculator = build_speculator(config, self._draft_target())  # None: off
        self.scheduler = Scheduler(
            config,
            self.block_manager,
            self.model_config.eos_token_ids,
            self.max_model_len,
            self.speculator,
        )
        self.sampler = Sampler(config.seed)
        self.runner = ModelRunner(self.model, self.kv_cache, self.sampler, self._graphs())
        self._arrivals = itertools.count()
        self._live: dict[str, Sequence] = {}

    def _draft_target(self) -> DraftTarget:
        """What a draft model must match (engine/speculative/draft_load.py)."""
        config = self.config
        return DraftTarget(
            self.model_config,
            self.tokenizer,
            self.max_model_len,
            self.layout.num_blocks,
            config.block_size,
            config.dtype,
            config.device,
            config.max_num_batched_tokens,
            config.quantization,
        )

    def _graphs(self) -> CudaGraphDecoder | None:
        if self.kv_cache.device.type != "cuda" or not self.config.cuda_graphs:
            return None
        max_blocks = -(-self.max_model_len // self.config.block_size)
        return CudaGraphDecoder(self.model, self.kv_cache, self.config.max_num_seqs, max_blocks)

    # -- requests -------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        hold_blocks: bool = False,
    ) -> Sequence:
        """Validate and queue a request; raises ValueError with the reason on bad input.

        With ``hold_blocks`` the request's KV blocks outlive it until :meth:`release`.
        """
        self._check_new_id(request_id)
        self.validate_prompt(prompt_token_ids)
        seq = Sequence(
            request_id,
            list(prompt_token_ids),
            params,
            next(self._arrivals),
            hold_blocks=hold_blocks,
        )
        self.scheduler.add(seq)
        self._live[request_id] = seq
        return seq

    def release(self, request_id: str) -> bool:
        """Free the blocks of a finished ``hold_blocks`` request."""
        return self.scheduler.release(request_id)

    def blocks_for_prompt(self, num_prompt_tokens: int) -> int:
        return -(-num_prompt_tokens // self.config.block_size)

    def reserve_blocks(self, count: int) -> list[int] | None:
        """Blocks for KV that another process will write; None if they are not free now."""
        if count > self.block_manager.num_free_blocks:
            return None
        return self.block_manager.allocate_blocks(count)

    def free_reserved(self, block_ids: list[int]) -> None:
        self.block_manager.free_blocks(block_ids)

    def add_prefilled(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token: int,
        block_ids: list[int],
        params: SamplingParams,
    ) -> StepOutput | None:
        """Join a request whose prompt KV has landed in ``block_ids`` to the running batch.

        The blocks come from :meth:`reserve_blocks`; on success the request owns them (on a
        ValueError the caller still does). Returns a final StepOutput if the first token
        (sampled by the prefill side) already finished the request, else None.
        """
        self._check_new_id(request_id)
        self.validate_prompt(prompt_token_ids)
        seq = Sequence(
            request_id,
            list(prompt_token_ids),
            params,
            next(self._arrivals),
            output_token_ids=[first_token],
            block_table=list(block_ids),
            prompt_logprobs_sent=True,  # the prefill side computed and sent them
        )
        if self.scheduler.add_prefilled(seq):
            return StepOutput(request_id, [], True, seq.finish_reason, seq.num_prompt_tokens, 0)
        self._live[request_id] = seq
        return None

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already running")

    def validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens; the context length is "
                f"{self.max_model_len} (at least one token must be generated)"
            )
        needed = math.ceil((len(token_ids) + 1) / self.config.block_size)
        if needed > self.layout.num_blocks:
            raise ValueError(
                f"prompt needs {needed} KV blocks; the cache has {self.layout.num_blocks}"
            )

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its blocks. False if it is unknown or already done."""
        seq = self.scheduler.abort(request_id)
        self._forget(request_id)
        return seq is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ---------------------------------------------------------------------------
    def step(self, after_layer: StepLayerHook | None = None) -> list[StepOutput]:
        """Run one batch. ``after_layer(layer, output)`` is called as each layer's KV for
        the step's chunks is in the cache (layer-wise KV transfer hooks in here)."""
        output = self.scheduler.schedule()
        if not output.scheduled:
            return []
        hook: LayerHook | None = None
        if after_layer is not None:

            def hook(layer: int) -> None:
                after_layer(layer, output)

        sampled = self.runner.execute(output.scheduled, hook)
        logprobs = self.runner.last_logprobs
        before = {c.seq.request_id: len(c.seq.output_token_ids) for c in output.scheduled}
        finished = {seq.request_id for seq in self.scheduler.update_from_output(output, sampled)}
        results = []
        for chunk in output.scheduled:
            seq = chunk.seq
            if seq.request_id not in sampled:
                continue
            done = seq.request_id in finished
            results.append(
                StepOutput(
                    seq.request_id,
                    seq.output_token_ids[before[seq.request_id] :],  # >1: speculation
                    done,
                    seq.finish_reason,
                    seq.num_prompt_tokens,
                    seq.num_cached_tokens,
                    *_logprob_fields(seq, logprobs.get(seq.request_id)),
                )
            )
            if done:
                self._forget(seq.request_id)
        return results

    def geometry(self) -> BlockGeometry:
        """What a KV peer or the router must know about this engine's blocks."""
        layout = self.layout
        return BlockGeometry(
            model=self.model_config.name,
            dtype=layout.dtype,
            block_size=layout.block_size,
            num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads,
            head_dim=layout.head_dim,
            num_blocks=layout.num_blocks,
            order=layout.order,
        )

    def take_kv_events(self) -> list[KVEvent]:
        return self.block_manager.take_events()

    def _forget(self, request_id: str) -> None:
        self._live.pop(request_id, None)
        self.sampler.forget(request_id)
        if self.speculator is not None:
            self.speculator.forget(request_id)

    def speculative_stats(self) -> SpeculativeStats:
        """Draft / accepted token counters (all zero when speculation is off)."""
        return self.speculator.stats() if self.speculator is not None else SpeculativeStats()

    # -- text -------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _logprob_fields(
    seq: Sequence, sampled: TokenLogprob | None
) -> tuple[list[TokenLogprob] | None, list[TokenLogprob] | None]:
    """(logprobs, prompt_logprobs) of a StepOutput; the prompt's go on the first output only."""
    token = [sampled] if sampled is not None else None
    if not seq.params.prompt_logprobs or seq.prompt_logprobs_sent:
        return token, None
    seq.prompt_logprobs_sent = True
    return token, list(seq.prompt_logprobs)


def _load_tokenizer(path: object) -> object:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {str(path)!r}: {exc}") from exc


def _max_model_len(config: EngineConfig, model: ModelConfig) -> int:
    if config.max_model_len is None:
        return model.context_len
    if config.max_model_len > model.context_len:
        raise ModelLoadError(
            f"max_model_len {config.max_model_len} exceeds the model's "
            f"context length {model.context_len}"
        )
    return config.max_model_len


def _kv_layout(config: EngineConfig, model: ModelConfig, max_model_len: int) -> KVLayout:
    kv_dtype = kv_quant.layout_dtype(config.kv_cache_dtype, config.dtype)
    probe = KVLayout(
        model.num_layers, model.num_kv_heads, model.head_dim, config.block_size, 1, kv_dtype
    )
    blocks = config.num_kv_blocks or int(config.kv_cache_gib * 2**30) // probe.bytes_per_block
    layout = KVLayout(
        model.num_layers,
        model.num_kv_heads,
        model.head_dim,
        config.block_size,
        blocks,
        kv_dtype,
        config.kv_cache_order,
    )
    if blocks < 1:
        raise ModelLoadError(
            f"kv_cache_gib={config.kv_cache_gib} is smaller than one block "
            f"({probe.bytes_per_block} bytes)"
        )
    available = _available_memory_bytes()
    if config.device == "cpu" and available is not None and layout.total_bytes > available:
        raise ModelLoadError(
            f"KV cache of {layout.total_bytes / 2**30:.2f} GiB ({blocks} blocks) does not fit "
            f"in the {available / 2**30:.2f} GiB of available memory; lower kv_cache_gib "
            "or num_kv_blocks"
        )
    return layout


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
