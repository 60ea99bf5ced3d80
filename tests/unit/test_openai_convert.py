"""OpenAI JSON ↔ router.api: request parsing and validation, reply shapes, error codes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.errors import ErrorCode, RequestError
from common.generation import FinishReason, Usage
from router import openai_convert as oc
from router.api import ChatMessage, ModelCard


def test_a_completion_fans_out_prompts_times_n_with_seed_plus_i() -> None:
    body = {"model": "m", "prompt": ["a", "b"], "n": 2, "seed": 5, "max_tokens": 3, "stop": "x"}
    req, inputs = oc.parse_completion(body, "cmpl-1")
    assert [i.prompt for i in inputs] == ["a", "a", "b", "b"]
    assert [i.request_id for i in inputs] == [f"cmpl-1-{k}" for k in range(4)]
    assert [i.sampling.seed for i in inputs] == [5, 6, 5, 6]
    s = inputs[0].sampling
    assert (s.max_tokens, s.stop, s.temperature, s.top_p) == (3, ("x",), 1.0, 0.0)
    assert inputs[0].model == "m" and not req.stream
    _, ids = oc.parse_completion({"prompt": [1, 2, 3], "temperature": 0}, "c")
    assert ids[0].token_ids == (1, 2, 3) and ids[0].sampling.temperature == 0.0
    _, many = oc.parse_completion({"prompt": [[1], [2]]}, "c")
    assert [i.token_ids for i in many] == [(1,), (2,)]


def test_chat_messages_parts_and_the_newer_token_limit() -> None:
    body = {
        "model": "",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": t} for t in ("hi ", "!")]},
        ],
        "max_tokens": 9,
        "max_completion_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "someone",
        "top_k": 3,
        "ignore_eos": True,
    }
    req, inputs = oc.parse_chat(body, "chatcmpl-1")
    assert inputs[0].messages == (ChatMessage("system", "be brief"), ChatMessage("user", "hi !"))
    assert inputs[0].sampling.max_tokens == 4 and inputs[0].sampling.top_k == 3
    assert inputs[0].sampling.ignore_eos and req.include_usage and req.stream


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_unsupported_parameters_are_refused_by_name(body: dict, param: str) -> None:
    with pytest.raises(RequestError) as info:
        oc.parse_completion(body, "c")
    reply = oc.request_error_reply(info.value)
    assert reply.status == 400 and reply.body["error"]["param"] == param


def test_chat_top_logprobs_need_logprobs_and_bad_values_are_400_with_the_param() -> None:
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(RequestError, match="requires logprobs"):
        oc.parse_chat({"messages": messages, "top_logprobs": 2}, "c")
    bads = (
        ({"temperature": -1}, "temperature"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 21}, "top_logprobs"),
    )
    for bad, param in bads:
        with pytest.raises(ValidationError) as info:
            oc.parse_chat({"messages": messages, **bad}, "c")
        reply = oc.validation_error_reply(info.value)
        assert reply.status == 400 and reply.body["error"]["param"] == param
    with pytest.raises(ValidationError):
        oc.parse_completion({}, "c")  # no prompt


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (ErrorCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (ErrorCode.NOT_FOUND, 404, "invalid_request_error"),
        (ErrorCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (ErrorCode.UNAVAILABLE, 503, "service_unavailable_error"),
        (ErrorCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
        (ErrorCode.INTERNAL, 500, "internal_error"),
    ],
)
def test_error_codes_and_shape(code: ErrorCode, status: int, kind: str) -> None:
    reply = oc.request_error_reply(RequestError(code, "why"))
    assert reply.status == status
    assert set(reply.body["error"]) == {"message", "type", "param", "code"}
    assert reply.body["error"]["message"] == "why" and reply.body["error"]["type"] == kind
    assert ("Retry-After" in reply.headers) == (status == 429)
    assert oc.unauthorized().status == 401 and oc.body_too_large(10).status == 413
    assert oc.unauthorized().body["error"]["code"] == "invalid_api_key"


def test_replies_and_usage_count_each_prompt_once() -> None:
    u = Usage(prompt_tokens=10, completion_tokens=3, cached_tokens=8)
    reply = oc.Reply(True, "chatcmpl-1", "m", 123)
    whole = reply.final(
        [oc.ChoiceResult("a", FinishReason.STOP, u), oc.ChoiceResult("b", FinishReason.LENGTH, u)],
        n=2,
    )
    assert whole["object"] == "chat.completion"
    assert [c["message"]["content"] for c in whole["choices"]] == ["a", "b"]
    assert [c["finish_reason"] for c in whole["choices"]] == ["stop", "length"]
    assert whole["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 6,
        "total_tokens": 16,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    first = reply.chunk(0, "he", None, first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "he"}
    last = reply.chunk(0, "", FinishReason.STOP)
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert reply.usage_chunk([u], 1)["choices"] == []
    text = oc.Reply(False, "cmpl-1", "m", 1).chunk(1, "x", None)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "x"


def test_models_list_one_entry_per_model_name() -> None:
    cards = [
        ModelCard("m", "chat", 2048, 1, 1, True),
        ModelCard("m", "code", 4096, 0, 1, False),
        ModelCard("other", "big", 8192, 1, 1, False),
    ]
    data = oc.models_json(cards)["data"]
    assert [(d["id"], d["pools"], d["max_model_len"]) for d in data] == [
        ("m", ["chat", "code"], 4096),
        ("other", ["big"], 8192),
    ]
