"""Build the engine's :class:`Speculator` from its EngineConfig (None when off)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.model_loader import ModelLoadError
from engine.speculative.speculator import Speculator

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.model_config import ModelConfig


def build_speculator(config: EngineConfig, target: ModelConfig) -> Speculator | None:
    """The configured speculator; raises ModelLoadError for an unusable draft model."""
    method = config.speculative_method
    if method == "none":
        return None
    if method == "ngram":
        return Speculator.ngram(
            config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max
        )
    # Draft-model drafting is not built yet: refuse it clearly rather than run without it.
    raise ModelLoadError(
        f"speculative_method={method!r} (draft model {config.draft_model!r}) is not "
        "supported yet; use 'ngram'"
    )
