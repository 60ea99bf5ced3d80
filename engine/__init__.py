"""pdserve's inference engine: paged KV cache, prefix cache, continuous batching.

The offline API is ``from engine import LLM, SamplingParams``; servers drive
:class:`engine.llm_engine.LLMEngine` step by step.
"""

from common.sampling import SamplingParams
from engine.config import EngineConfig


def __getattr__(name: str) -> object:
    # Lazy: importing the package for SamplingParams must not pull in torch/transformers.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "EngineConfig", "LLMEngine", "SamplingParams"]
