"""Bad input and bad configuration fail with a clear error, and the engine keeps working."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.model_loader import ModelLoadError
from tests.integration.engine_helpers import default_path


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(num_kv_blocks=24, max_model_len=512)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "empty"),
        ("", "empty"),
        ([1] * 600, "context length"),
        ([10**7], "vocabulary"),
        ([-1], "vocabulary"),
    ],
)
def test_bad_prompts(llm: LLM, prompt: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], SamplingParams(max_tokens=4))
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].token_ids


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_bad_sampling_params(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_prompt_larger_than_cache_is_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([[1] * 500], SamplingParams(max_tokens=2))  # fits the context, not the cache


def test_missing_model_path() -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(model="/nonexistent/model")


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        LLM(model=str(tmp_path))


def test_kv_cache_that_does_not_fit() -> None:
    with pytest.raises(ModelLoadError, match="does not fit"):
        LLM(kv_cache_gib=100_000)


def test_unknown_engine_option() -> None:
    with pytest.raises(TypeError, match="unknown engine options"):
        LLM(block_sise=16)


def test_bad_engine_config() -> None:
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)


def test_checkpoint_without_weights(tmp_path: Path) -> None:
    shutil.copy(default_path() / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match="safetensors"):
        LLM(model=str(tmp_path))
