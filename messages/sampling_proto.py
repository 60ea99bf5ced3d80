""":class:`~common.sampling.SamplingParams` ↔ ``worker_pb2.SamplingParams``, one rule for
both RPCs that carry it (``Decode`` and ``Prefill``).

The rule, from proto: proto3 cannot tell an unset scalar from zero, so zero means unset
where zero is not a valid value —

* ``top_p`` 0 → 1.0 (nucleus sampling disabled);
* ``max_tokens`` 0 → the receiver's ``default_max_tokens``: the prefill worker samples the
  first token only, so its default is 1; the decode worker has none, so an unset
  ``max_tokens`` is invalid there (every sender sets it: the router resolves the client's
  value, the decode worker forwards the request's own);
* ``seed``, ``logprobs`` and ``speculative`` are presence fields: unset → None;
* everything else is taken as is, and :class:`SamplingParams` validates the result
  (``ValueError``, which servicers answer with INVALID_ARGUMENT).

To proto every field is written; an unset seed stays unset.
"""

from __future__ import annotations

from common.sampling import SamplingParams
from proto import worker_pb2


def sampling_to_proto(params: SamplingParams) -> worker_pb2.SamplingParams:
    message = worker_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        message.seed = params.seed
    if params.logprobs is not None:
        message.logprobs = params.logprobs
    if params.speculative is not None:
        message.speculative = params.speculative
    message.prompt_logprobs = params.prompt_logprobs
    return message


def sampling_from_proto(
    sampling: worker_pb2.SamplingParams, default_max_tokens: int | None = None
) -> SamplingParams:
    """ValueError on invalid values; see the module docstring for what zero means."""
    max_tokens = sampling.max_tokens
    if max_tokens == 0 and default_max_tokens is not None:
        max_tokens = default_max_tokens
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p or 1.0,
        top_k=sampling.top_k,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop_token_ids=tuple(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        logprobs=sampling.logprobs if sampling.HasField("logprobs") else None,
        prompt_logprobs=sampling.prompt_logprobs,
        speculative=sampling.speculative if sampling.HasField("speculative") else None,
    )
