"""Shared fixtures' building blocks for tests that run the real model in-process."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from engine.model_loader import ensure_default_model


@functools.cache
def hf_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_path(), dtype=torch.float32).eval()


@functools.cache
def default_path() -> Path:
    return ensure_default_model()


def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF ``generate``'s greedy continuation, stopping at EOS like our engine."""
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    return out[0, len(prompt_ids) :].tolist()
