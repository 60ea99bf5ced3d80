"""A model's tokenizer, chat template and context facts, without torch.

transformers' ``AutoTokenizer`` imports torch, and the router must not. This reads the same
files a HF checkpoint directory has — ``tokenizer.json`` (the ``tokenizers`` library),
the chat template (``chat_template.jinja`` or ``tokenizer_config.json``), ``config.json``
and ``generation_config.json`` — and reproduces what the engine does with them:

- a prompt string is encoded with the tokenizer's special tokens (``encode(text)``);
- chat messages are rendered with the template (``add_generation_prompt=True``) in a
  sandboxed jinja2 environment set up like transformers', then encoded *without* special
  tokens (the template already wrote them);
- text is decoded with special tokens skipped.

The default model lives at ``<cache_dir>/models/SmolLM2-135M-Instruct`` once converted
(``make`` does it; the engine does it on first use). A router started before it is converted
runs the engine's converter, ``python -m engine.prepare_model``, in a child process (the
router itself never imports torch); its progress lines go to the router's stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from common import env, model_cache
from router.config import DEFAULT_MODEL_NAME


class ModelFilesError(RuntimeError):
    """The model directory is missing or lacks a file the router needs."""


def default_model_dir() -> Path:
    """Where the engine converts the default model (same path as engine.model_loader)."""
    return env.cache_dir() / "models" / DEFAULT_MODEL_NAME


def ensure_default_converted(timeout_s: float = 900.0) -> None:
    """Convert the default model if it is not yet (in a child: the converter needs torch)."""
    if model_cache.is_converted(default_model_dir()):
        return
    done = subprocess.run(
        [sys.executable, "-m", "engine.prepare_model"],
        stdout=2,  # its report line beside its progress lines, on our stderr
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise ModelFilesError(
            f"converting the default model failed (python -m engine.prepare_model exited "
            f"{done.returncode}; its output is above)"
        )


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the router needs to know about a model besides its tokenizer."""

    vocab_size: int
    context_len: int  # max_position_embeddings, capped by a sliding window (as the engine)
    eos_token_ids: frozenset[int]


class ModelTokenizer:
    """Encode / chat-template / decode for one model. Thread-safe for reads."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None,
        special: dict[str, str],
        facts: ModelFacts,
    ) -> None:
        self._tok = tokenizer
        self.facts = facts
        self._special = special
        self._template = _compile(chat_template) if chat_template else None

    @classmethod
    def load(cls, model_dir: str | Path | None) -> ModelTokenizer:
        path = Path(model_dir).expanduser() if model_dir else default_model_dir()
        if model_dir is None:
            ensure_default_converted()
        if not (path / "tokenizer.json").is_file():
            raise ModelFilesError(f"no tokenizer.json in {str(path)!r}")
        tok_config = _read_json(path / "tokenizer_config.json")
        template = tok_config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        special = {
            key: _token_text(tok_config.get(key))
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        return cls(
            Tokenizer.from_file(str(path / "tokenizer.json")), template, special, _read_facts(path)
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Render ``messages`` for generation and tokenize; ValueError if the template
        rejects them (e.g. ``raise_exception`` on a role order it does not support)."""
        if self._template is None:
            raise ValueError("this model has no chat template; send a prompt or token ids")
        try:
            text = self._template.render(
                messages=list(messages), add_generation_prompt=True, **self._special
            )
        except TemplateError as exc:
            raise ValueError(f"chat template: {exc}") from exc
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=True)


def _compile(source: str) -> Template:
    """The same environment transformers renders chat templates in (sandboxed, trimmed)."""

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
        x, ensure_ascii=False, indent=indent
    )
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def _read_facts(path: Path) -> ModelFacts:
    config = _read_json(path / "config.json")
    if not config:
        raise ModelFilesError(f"no config.json in {str(path)!r}")
    context = int(config.get("max_position_embeddings") or 0)
    window = config.get("sliding_window")
    if config.get("model_type") == "qwen2" and not config.get("use_sliding_window", False):
        window = None
    if window:
        context = min(context, int(window)) if context else int(window)
    if context < 2:
        raise ModelFilesError(f"{str(path)!r}: config.json has no usable context length")
    eos: set[int] = set()
    for source in (config, _read_json(path / "generation_config.json")):
        value = source.get("eos_token_id")
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, list):
            eos.update(int(v) for v in value)
    return ModelFacts(int(config["vocab_size"]), context, frozenset(eos))
