"""Llama, Qwen2 and Mistral checkpoints (tiny, random, built here) run through our forward
pass and match HF transformers' logits and greedy tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from tests.integration.engine_helpers import default_path, hf_greedy

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
COMMON = dict(
    vocab_size=49152,
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.3,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)


def _configs() -> dict[str, object]:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "llama-rope-llama3": LlamaConfig(
            **COMMON,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        ),
        "llama-linear-bias": LlamaConfig(
            **COMMON,
            attention_bias=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        ),
        "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=False),
        "mistral": MistralConfig(**COMMON, sliding_window=256),
    }


@pytest.fixture(
    scope="module", params=["llama-rope-llama3", "llama-linear-bias", "qwen2", "mistral"]
)
def checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[request.param]).eval()
    if getattr(model.config, "attention_bias", False) or request.param == "qwen2":
        with torch.no_grad():  # HF initialises biases to zero; make them matter
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.3)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(default_path() / name, path / name)
    return path, model


def test_prefill_logits_match(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    path, hf = checkpoint
    engine = LLM(model=str(path), dtype="float32", num_kv_blocks=64).engine
    prompt = list(range(1000, 1100))
    engine.add_request("r", prompt, SamplingParams(max_tokens=1, temperature=0.0))
    batch = engine.runner.prepare(engine.scheduler.schedule().scheduled)
    with torch.inference_mode():
        hidden = engine.model(batch.input_ids, batch.positions, engine.kv_cache, batch.meta)
        ours = engine.model.compute_logits(hidden)
        theirs = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


def test_greedy_tokens_match(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    path, hf = checkpoint
    llm = LLM(model=str(path), dtype="float32", num_kv_blocks=64, max_num_batched_tokens=64)
    prompts = [list(range(2000, 2000 + n)) for n in (5, 40, 150)]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == hf_greedy(hf, prompt, 24)
