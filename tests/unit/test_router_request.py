"""Request validation and tokenization, against the engine's own tokenizer handling."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from common.errors import ErrorCode, RequestError
from router.api import ChatMessage, GenerateInput, SamplingSpec
from router.config import LimitsConfig
from router.request import check_input, finalize, tokenize
from router.tokenizer import ModelTokenizer, default_model_dir

LIMITS = LimitsConfig(max_request_chars=1000, max_messages=4, default_max_tokens=32)


@pytest.fixture(scope="module")
def tok() -> ModelTokenizer:
    return ModelTokenizer.load(default_model_dir())


def invalid(req: GenerateInput, limits: LimitsConfig = LIMITS) -> str:
    with pytest.raises(RequestError) as err:
        check_input(req, limits)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    return err.value.message


def test_valid_inputs_pass_and_get_an_id() -> None:
    assert check_input(GenerateInput(request_id="r1", prompt="hi"), LIMITS) == "r1"
    generated = check_input(GenerateInput(token_ids=(1, 2)), LIMITS)
    assert len(generated) == 32
    msgs = (ChatMessage("system", "be brief"), ChatMessage("user", "hi"))
    assert check_input(GenerateInput(messages=msgs), LIMITS)


@pytest.mark.parametrize(
    ("req", "needle"),
    [
        (GenerateInput(), "exactly one"),
        (GenerateInput(prompt=""), "prompt is empty"),
        (GenerateInput(token_ids=()), "token_ids is empty"),
        (GenerateInput(messages=()), "messages is empty"),
        (GenerateInput(messages=(ChatMessage("wizard", "hi"),)), "unknown role 'wizard'"),
        (GenerateInput(messages=(ChatMessage("user", ""),)), "every message is empty"),
        (GenerateInput(messages=(ChatMessage("user", "x"),) * 5), "too many messages"),
        (GenerateInput(prompt="x" * 1001), "request too large"),
        (GenerateInput(messages=(ChatMessage("user", "x" * 600),) * 2), "request too large"),
        (GenerateInput(request_id="a\nb", prompt="x"), "request_id"),
        (GenerateInput(prompt="x", sampling=SamplingSpec(temperature=-1)), "temperature"),
        (GenerateInput(prompt="x", sampling=SamplingSpec(temperature=math.nan)), "temperature"),
        (GenerateInput(prompt="x", sampling=SamplingSpec(temperature=math.inf)), "temperature"),
        (GenerateInput(prompt="x", sampling=SamplingSpec(top_p=1.5)), "top_p"),
        (GenerateInput(prompt="x", sampling=SamplingSpec(top_p=math.nan)), "top_p"),
        (GenerateInput(prompt="x", sampling=SamplingSpec(stop=("",))), "stop strings"),
        (GenerateInput(prompt="x", sampling=SamplingSpec(stop=("s",) * 17)), "too many stop"),
    ],
)
def test_bad_inputs_are_invalid_argument(req: GenerateInput, needle: str) -> None:
    assert needle in invalid(req, LimitsConfig(max_request_chars=1000, max_messages=4))


def test_prompt_tokenization_matches_transformers(tok: ModelTokenizer) -> None:
    # The engine tokenizes with transformers (which imports torch); the router must not.
    script = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({str(default_model_dir())!r})\n"
        "msgs = [{'role': 'system', 'content': 'Be terse.'}, {'role': 'user', 'content': 'Hi 🎉'},"
        " {'role': 'assistant', 'content': 'Hello!'}, {'role': 'user', 'content': 'Bye'}]\n"
        "text = t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)\n"
        "chat = t.encode(text, add_special_tokens=False)\n"
        "user_only = t.encode(t.apply_chat_template(msgs[1:2], tokenize=False,"
        " add_generation_prompt=True), add_special_tokens=False)\n"
        "print(json.dumps([t.encode('The capital of France is'), chat, user_only]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    plain, chat, user_only = json.loads(out.stdout.strip().splitlines()[-1])
    assert tokenize(GenerateInput(prompt="The capital of France is"), tok) == tuple(plain)
    msgs = (
        ChatMessage("system", "Be terse."),
        ChatMessage("user", "Hi 🎉"),
        ChatMessage("assistant", "Hello!"),
        ChatMessage("user", "Bye"),
    )
    assert tokenize(GenerateInput(messages=msgs), tok) == tuple(chat)
    # No system message: the template inserts its default one.
    assert tokenize(GenerateInput(messages=msgs[1:2]), tok) == tuple(user_only)


def test_token_ids_outside_the_vocabulary(tok: ModelTokenizer) -> None:
    with pytest.raises(RequestError, match="outside the vocabulary"):
        tokenize(GenerateInput(token_ids=(1, 49152)), tok)
    assert tokenize(GenerateInput(token_ids=(1, 49151)), tok) == (1, 49151)


def test_finalize_resolves_max_tokens_against_the_context() -> None:
    prompt = tuple(range(90))
    spec = SamplingSpec(max_tokens=0, top_p=0.0, seed=3)
    done = finalize("r", prompt, spec, 100, 1000, LIMITS)
    assert done.sampling.max_tokens == 10  # default 32, capped by the room left
    assert done.sampling.top_p == 1.0 and done.sampling.seed == 3
    assert finalize("r", prompt, SamplingSpec(max_tokens=10), 100, 1000, LIMITS)
    with pytest.raises(RequestError, match="max_tokens 11 is too large"):
        finalize("r", prompt, SamplingSpec(max_tokens=11), 100, 1000, LIMITS)
    with pytest.raises(RequestError, match="context length is 90"):
        finalize("r", prompt, SamplingSpec(), 90, 1000, LIMITS)
    with pytest.raises(RequestError, match="stop_token_ids"):
        finalize("r", prompt, SamplingSpec(stop_token_ids=(1000,)), 100, 1000, LIMITS)


def test_model_facts(tok: ModelTokenizer) -> None:
    assert tok.facts.vocab_size == 49152
    assert tok.facts.context_len == 8192
    assert 2 in tok.facts.eos_token_ids
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}])  # it has a template


def test_the_router_does_not_import_torch() -> None:
    script = (
        "import sys\n"
        "import router.server, router.__main__, router.client\n"
        "from router.tokenizer import ModelTokenizer, default_model_dir\n"
        "ModelTokenizer.load(default_model_dir()).encode('hi')\n"
        "heavy = ('torch', 'transformers', 'sentence_transformers')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
