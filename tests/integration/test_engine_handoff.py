"""Prefill in one engine, decode in another: the engine-side hooks of disaggregation.

The KV is copied in-process here (gather → scatter into different block ids); the real
transfer between processes is kv_transfer's business and has its own tests.

The engines are pinned to fp32: the expected tokens come from one batched run, the handed
over ones from solo and prefix-cached prefills, and only fp32 is batch-invariant (bf16
rounds differently when a GEMM's row count changes; test_engine_bf16.py states its bounds).
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine
from engine.scheduler import SchedulerOutput

FP32 = "float32"
PARAMS = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def pair() -> tuple[LLMEngine, LLMEngine]:
    prefill = LLM(dtype=FP32, num_kv_blocks=96).engine
    decode = LLM(dtype=FP32, num_kv_blocks=80).engine
    decode.reserve_blocks(7)  # so destination block ids differ from the source's
    return prefill, decode


def prefill_and_hand_over(
    prefill: LLMEngine, decode: LLMEngine, request_id: str, prompt: list[int], layer_wise: bool
) -> None:
    seq = prefill.add_request(
        request_id, prompt, SamplingParams(max_tokens=1, temperature=0.0), hold_blocks=True
    )
    dest = decode.reserve_blocks(decode.blocks_for_prompt(len(prompt)))
    assert dest is not None
    landed: list[int] = []

    def copy_layer(layer: int, output: SchedulerOutput) -> None:
        if any(chunk.seq is seq and chunk.samples for chunk in output.scheduled):
            src = torch.tensor(seq.block_table)
            decode.kv_cache.scatter(torch.tensor(dest), prefill.kv_cache.gather(src, layer), layer)
            landed.append(layer)

    while not seq.is_finished:
        prefill.step(copy_layer if layer_wise else None)
    if layer_wise:
        assert landed == list(range(prefill.model_config.num_layers))
    else:
        src = torch.tensor(seq.block_table)
        decode.kv_cache.scatter(torch.tensor(dest), prefill.kv_cache.gather(src))
    assert prefill.release(request_id)
    done = decode.add_prefilled(request_id, prompt, seq.output_token_ids[0], dest, PARAMS)
    assert done is None


@pytest.mark.parametrize("layer_wise", [False, True])
def test_handoff_matches_single_engine(pair: tuple[LLMEngine, LLMEngine], layer_wise: bool) -> None:
    prefill, decode = pair
    prompts = [list(range(500 + i, 540 + 37 * i)) for i in range(4)]
    expected = [o.token_ids for o in LLM(dtype=FP32, num_kv_blocks=96).generate(prompts, PARAMS)]
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        rid = f"{layer_wise}-{i}"
        prefill_and_hand_over(prefill, decode, rid, prompt, layer_wise)
        tokens[rid] = []
    while decode.has_unfinished():
        for out in decode.step():
            tokens[out.request_id].extend(out.new_token_ids)
    got = [tokens[f"{layer_wise}-{i}"] for i in range(len(prompts))]
    # The decode side reports only what it sampled; the first token came from prefill.
    assert [g[: PARAMS.max_tokens - 1] for g in got] == [e[1:] for e in expected]
    assert prefill.block_manager.num_used_blocks == 0
    assert decode.block_manager.num_used_blocks == 7


def test_first_token_can_finish_the_request(pair: tuple[LLMEngine, LLMEngine]) -> None:
    _, decode = pair
    dest = decode.reserve_blocks(1)
    assert dest is not None
    out = decode.add_prefilled("one", [1, 2, 3], 42, dest, SamplingParams(max_tokens=1))
    assert out is not None and out.finished and out.finish_reason.value == "length"
    assert decode.block_manager.num_used_blocks == 7


def test_abort_releases_held_blocks(pair: tuple[LLMEngine, LLMEngine]) -> None:
    prefill, _ = pair
    seq = prefill.add_request(
        "held", list(range(100, 150)), SamplingParams(max_tokens=1), hold_blocks=True
    )
    while not seq.is_finished:
        prefill.step()
    assert prefill.block_manager.num_used_blocks == len(seq.block_table) > 0
    prefill.abort("held")
    assert prefill.block_manager.num_used_blocks == 0
    assert not prefill.release("held")
