"""What a generation ends with, the same on every boundary: :class:`FinishReason` and
:class:`Usage`.

The engine sets them, the decode worker streams them, the router reports them to the
client; each boundary's conversion module (:mod:`messages`, :mod:`router.api_proto`) maps
them to its proto enum and message. Torch-free and proto-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FinishReason(StrEnum):
    STOP = "stop"  # EOS, a stop token id, or (in the router) a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # cancelled by the caller


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request, so far or in total."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served by a prefix cache
