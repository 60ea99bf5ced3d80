"""Build the engine's :class:`Speculator` from its EngineConfig (None when off)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.speculative.speculator import Speculator

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.speculative.draft_load import DraftTarget


def build_speculator(config: EngineConfig, target: DraftTarget) -> Speculator | None:
    """The configured speculator; raises ModelLoadError for an unusable draft model."""
    method = config.speculative_method
    if method == "none":
        return None
    if method == "ngram":
        return Speculator.ngram(
            config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max
        )
    from engine.speculative.draft_load import load_draft  # loads torch models: only if used

    if config.draft_model is None:  # EngineConfig rejects this; keep the type checker honest
        raise ValueError("speculative_method='draft' needs draft_model")
    proposer = load_draft(config.draft_model, target)
    return Speculator(config.num_speculative_tokens, proposer, proposer.forget)
