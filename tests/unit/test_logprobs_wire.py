"""Log-probs across the boundaries: proto round trips, router request checks, OpenAI JSON."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.errors import RequestError
from common.generation import FinishReason, Usage
from common.logprobs import TokenLogprob
from common.sampling import SamplingParams
from messages.decode import TokenDelta
from messages.decode_proto import delta_from_proto, delta_to_proto
from messages.prefill import PrefillResult
from messages.prefill_proto import result_from_proto, result_to_proto
from messages.sampling_proto import sampling_from_proto, sampling_to_proto
from router import api_proto
from router import openai_convert as oc
from router.api import Chunk, GenerateInput, SamplingSpec
from router.config import LimitsConfig
from router.migration import resume_request
from router.request import _check_sampling, finalize

LPS = (
    TokenLogprob(5, -0.25, ((5, -0.25), (7, -1.5))),
    TokenLogprob(9, -3.0, ()),
)


def test_sampling_fields_round_trip_with_presence() -> None:
    for params in (
        SamplingParams(),
        SamplingParams(logprobs=0, prompt_logprobs=True, speculative=False),
        SamplingParams(logprobs=20, speculative=True),
    ):
        assert sampling_from_proto(sampling_to_proto(params)) == params


def test_delta_and_prefill_result_round_trip() -> None:
    delta = TokenDelta((5, 9), FinishReason.STOP, Usage(3, 2, 0), "p", LPS, LPS[:1])
    asked = SamplingParams(logprobs=2, prompt_logprobs=True)
    assert delta_from_proto(delta_to_proto(delta), asked) == delta
    plain = TokenDelta((5,), None, None, "")
    assert delta_from_proto(delta_to_proto(plain), SamplingParams()) == plain
    # asked, but none yet (a one-token prompt has no prompt log-probs): empty, not None
    empty = delta_from_proto(delta_to_proto(plain), asked)
    assert empty.prompt_logprobs == () and empty.logprobs == ()

    result = PrefillResult(5, 0, 3, 100, 0.1, LPS[0], LPS)
    assert result_from_proto(result_to_proto(result), prompt_logprobs=True) == result
    bare = PrefillResult(5, 0, 3, 100, 0.1)
    assert result_from_proto(result_to_proto(bare)) == bare


def test_public_api_round_trip() -> None:
    spec = SamplingSpec(logprobs=3, prompt_logprobs=True, speculative=False)
    back = api_proto.input_from_proto(
        api_proto.input_to_proto(GenerateInput(prompt="x", sampling=spec))
    )
    assert back.sampling == spec
    unset = api_proto.input_from_proto(api_proto.input_to_proto(GenerateInput(prompt="x")))
    assert (unset.sampling.logprobs, unset.sampling.speculative) == (None, None)
    chunk = Chunk("r", "ab", (5, 9), logprobs=LPS, prompt_logprobs=LPS[1:])
    assert api_proto.chunk_from_proto(api_proto.chunk_to_proto(chunk)) == chunk


@pytest.mark.parametrize("bad", [-1, 21])
def test_router_refuses_bad_logprobs(bad: int) -> None:
    with pytest.raises(RequestError, match="logprobs") as info:
        _check_sampling(SamplingSpec(logprobs=bad), LimitsConfig())
    assert info.value.code.name == "INVALID_ARGUMENT"


def test_openai_requests_map_to_logprobs() -> None:
    _, (one,) = oc.parse_completion({"prompt": "x", "logprobs": 0}, "c")
    assert one.sampling.logprobs == 0
    _, (plain,) = oc.parse_completion({"prompt": "x"}, "c")
    assert plain.sampling.logprobs is None
    msgs = [{"role": "user", "content": "x"}]
    _, (chat,) = oc.parse_chat({"messages": msgs, "logprobs": True, "top_logprobs": 4}, "c")
    assert chat.sampling.logprobs == 4
    _, (chat0,) = oc.parse_chat({"messages": msgs, "logprobs": True}, "c")
    assert chat0.sampling.logprobs == 0
    _, (off,) = oc.parse_chat({"messages": msgs, "logprobs": False}, "c")
    assert off.sampling.logprobs is None
    for bad in (-1, 21):
        with pytest.raises(ValidationError) as info:
            oc.parse_completion({"prompt": "x", "logprobs": bad}, "c")
        assert oc.validation_error_reply(info.value).body["error"]["param"] == "logprobs"


TEXTS = {5: "Hi", 7: "Hey", 9: " there"}


def test_openai_chat_shape_whole_and_streamed() -> None:
    reply = oc.Reply(True, "id", "m", 0, logprobs=True)
    acc = reply.accumulator()
    acc.add(LPS, TEXTS)
    body = reply.final([oc.ChoiceResult("Hi there", FinishReason.STOP, None, acc)], 1)
    content = body["choices"][0]["logprobs"]["content"]
    assert content[0] == {
        "token": "Hi",
        "logprob": -0.25,
        "bytes": [72, 105],
        "top_logprobs": [
            {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
            {"token": "Hey", "logprob": -1.5, "bytes": [72, 101, 121]},
        ],
    }
    assert content[1]["top_logprobs"] == []
    event = reply.chunk(0, "Hi", None, first=True, logprobs=LPS[:1], texts=TEXTS)
    assert [c["token"] for c in event["choices"][0]["logprobs"]["content"]] == ["Hi"]
    plain = oc.Reply(True, "id", "m", 0)
    assert plain.chunk(0, "Hi", None, first=True)["choices"][0]["logprobs"] is None
    assert plain.accumulator() is None


def test_openai_completion_shape_offsets_run_across_chunks() -> None:
    reply = oc.Reply(False, "id", "m", 0, logprobs=True)
    first = reply.chunk(0, "Hi", None, logprobs=LPS[:1], texts=TEXTS)["choices"][0]["logprobs"]
    second = reply.chunk(0, " there", None, logprobs=LPS[1:], texts=TEXTS)["choices"][0]
    assert first == {
        "tokens": ["Hi"],
        "token_logprobs": [-0.25],
        "top_logprobs": [{"Hi": -0.25, "Hey": -1.5}],
        "text_offset": [0],
    }
    assert second["logprobs"]["text_offset"] == [2]
    acc = reply.accumulator()
    acc.add(LPS, TEXTS)
    whole = reply.final([oc.ChoiceResult("Hi there", None, None, acc)], 1)
    assert whole["choices"][0]["logprobs"]["text_offset"] == [0, 2]


def test_router_carries_the_fields_into_sampling_params() -> None:
    spec = SamplingSpec(max_tokens=2, logprobs=4, prompt_logprobs=True, speculative=False)
    prepared = finalize("r", (1, 2, 3), spec, 100, 1000, LimitsConfig())
    assert prepared.sampling.logprobs == 4
    assert prepared.sampling.prompt_logprobs is True
    assert prepared.sampling.speculative is False
    default = finalize("r", (1, 2, 3), SamplingSpec(max_tokens=2), 100, 1000, LimitsConfig())
    assert default.sampling.speculative is None and default.sampling.logprobs is None


def test_a_migrated_continuation_does_not_ask_for_the_prompt_again() -> None:
    spec = SamplingSpec(max_tokens=5, logprobs=1, prompt_logprobs=True)
    prepared = finalize("r", (1, 2, 3), spec, 100, 1000, LimitsConfig())
    resumed = resume_request(prepared, [7, 8])
    assert resumed.token_ids == (1, 2, 3, 7, 8) and resumed.sampling.max_tokens == 3
    assert resumed.sampling.logprobs == 1 and resumed.sampling.prompt_logprobs is False
