"""The offline API: ``LLM(model).generate(prompts, sampling)``.

Adds every prompt to one engine and steps it until all finish, so the prompts are batched
continuously; outputs come back in prompt order.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, fields

from common.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, StepOutput, TokenLogprob

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **options: object) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine options {unknown}; valid: {sorted(known)}")
        self.engine = LLMEngine(EngineConfig(model=model, **options))  # type: ignore[arg-type]
        self._next_id = 0

    @property
    def tokenizer(self) -> object:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        prompt_list = [prompts] if _is_single_prompt(prompts) else list(prompts)
        params = _per_prompt(sampling, len(prompt_list))
        ids = [self._add(prompt, p) for prompt, p in zip(prompt_list, params, strict=True)]
        return self._run(ids)

    def chat(
        self,
        conversations: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        batch = (
            [conversations]
            if conversations and isinstance(conversations[0], dict)
            else conversations
        )
        prompts = [self.engine.apply_chat_template(messages) for messages in batch]  # type: ignore[arg-type]
        return self.generate(prompts, sampling)

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        token_ids = self.engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request_id = f"offline-{self._next_id}"
        self._next_id += 1
        self.engine.add_request(request_id, token_ids, params)
        return request_id

    def _run(self, request_ids: list[str]) -> list[CompletionOutput]:
        tokens: dict[str, list[int]] = {rid: [] for rid in request_ids}
        logprobs: dict[str, _Logprobs] = {rid: _Logprobs() for rid in request_ids}
        done: dict[str, CompletionOutput] = {}
        try:
            while len(done) < len(request_ids):
                for out in self.engine.step():
                    tokens[out.request_id].extend(out.new_token_ids)
                    logprobs[out.request_id].add(out)
                    if out.finished:
                        ids = tokens[out.request_id]
                        done[out.request_id] = CompletionOutput(
                            out.request_id,
                            ids,
                            self.engine.decode(ids),
                            out.finish_reason,
                            out.prompt_tokens,
                            out.cached_tokens,
                            logprobs[out.request_id].tokens,
                            logprobs[out.request_id].prompt,
                        )
        finally:
            for rid in request_ids:
                if rid not in done:
                    self.engine.abort(rid)
        return [done[rid] for rid in request_ids]


@dataclass(slots=True)
class _Logprobs:
    """A request's log-probs gathered from its StepOutputs (None where not asked)."""

    tokens: list[TokenLogprob] | None = None
    prompt: list[TokenLogprob] | None = None

    def add(self, out: StepOutput) -> None:
        if out.logprobs is not None:
            if self.tokens is None:
                self.tokens = []
            self.tokens.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt = out.prompt_logprobs


def _is_single_prompt(prompts: Prompt | Seq[Prompt]) -> bool:
    return isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))


def _per_prompt(
    sampling: SamplingParams | Seq[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if sampling is None:
        return [SamplingParams()] * count
    if isinstance(sampling, SamplingParams):
        return [sampling] * count
    if len(sampling) != count:
        raise ValueError(f"got {len(sampling)} SamplingParams for {count} prompts")
    return list(sampling)
