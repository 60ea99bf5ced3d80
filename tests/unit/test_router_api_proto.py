"""router.api_proto: the public boundary's conversions invert each other, both directions."""

from __future__ import annotations

import pytest

from common.generation import FinishReason, Usage
from proto import serving_pb2
from router import api_proto
from router.api import ChatMessage, Chunk, GenerateInput, ModelCard, RouteInfo, SamplingSpec
from router.client import build_request

SAMPLING = SamplingSpec(
    max_tokens=5,
    temperature=0.5,
    top_p=0.25,
    top_k=7,
    seed=42,
    stop=("\n\n", "END"),
    ignore_eos=True,
    stop_token_ids=(2, 3),
)


@pytest.mark.parametrize(
    "req",
    [
        GenerateInput(request_id="r1", model="chat", prompt="hi", sampling=SAMPLING),
        GenerateInput(messages=(ChatMessage("system", "be brief"), ChatMessage("user", "hi"))),
        GenerateInput(token_ids=(1, 2, 3)),
        GenerateInput(prompt=""),  # set but empty: still the prompt (check_input rejects it)
        GenerateInput(messages=()),
        GenerateInput(token_ids=()),
        GenerateInput(),  # no input at all
    ],
)
def test_a_request_survives_the_wire(req: GenerateInput) -> None:
    wire = serving_pb2.GenerateRequest.FromString(api_proto.input_to_proto(req).SerializeToString())
    assert api_proto.input_from_proto(wire) == req


def test_seed_zero_is_a_seed_and_absent_is_none() -> None:
    zero = api_proto.input_to_proto(GenerateInput(prompt="x", sampling=SamplingSpec(seed=0)))
    assert zero.sampling.HasField("seed")
    assert api_proto.input_from_proto(zero).sampling.seed == 0
    unset = api_proto.input_to_proto(GenerateInput(prompt="x"))
    assert not unset.sampling.HasField("seed")
    assert api_proto.input_from_proto(unset).sampling.seed is None


@pytest.mark.parametrize(
    "chunk",
    [
        Chunk(
            "r1",
            "Bon",
            (10, 11),
            route=RouteInfo("default", "p0", "d0", "code", "prefix_aware", 128, 2, "remote"),
        ),
        Chunk("r1", "jour 🎉", (12,)),
        *(
            Chunk("r1", "", (), finish_reason=reason, usage=Usage(9, 3, 4))
            for reason in FinishReason
        ),
    ],
)
def test_a_chunk_survives_the_wire(chunk: Chunk) -> None:
    wire = serving_pb2.GenerateResponse.FromString(
        api_proto.chunk_to_proto(chunk).SerializeToString()
    )
    assert api_proto.chunk_from_proto(wire) == chunk


def test_every_finish_reason_has_its_own_proto_value() -> None:
    values = {
        api_proto.chunk_to_proto(Chunk("r", "", (), finish_reason=reason)).finish_reason
        for reason in FinishReason
    }
    assert len(values) == len(FinishReason)
    assert serving_pb2.FINISH_REASON_UNSPECIFIED not in values


def test_model_cards_survive_the_wire() -> None:
    cards = [ModelCard("SmolLM2", "default", 8192, 1, 2, True), ModelCard("m", "b", 2, 0, 1, False)]
    wire = serving_pb2.ListModelsResponse.FromString(
        api_proto.models_to_proto(cards).SerializeToString()
    )
    assert api_proto.models_from_proto(wire) == cards


def test_build_request_sends_the_first_given_input() -> None:
    chat = build_request("hi", chat=True, system="be brief", max_tokens=3, seed=1)
    assert [(m.role, m.content) for m in chat.messages.messages] == [
        ("system", "be brief"),
        ("user", "hi"),
    ]
    assert (chat.sampling.max_tokens, chat.sampling.seed) == (3, 1)
    both = build_request("ignored", messages=[("user", "m")], token_ids=[1])
    assert both.WhichOneof("input") == "messages"
    assert build_request("p", token_ids=[1, 2]).WhichOneof("input") == "token_ids"
    assert build_request("p").prompt == "p"
    assert build_request().WhichOneof("input") is None
    assert not build_request("p").sampling.HasField("seed")
