"""A self-draft checkpoint for speculative decoding tests and benchmarks: the converted
SmolLM2-135M-Instruct keeping only some of its decoder layers (the first few by default),
written as a HF checkpoint directory with the target's tokenizer files.

    python -m tests.draft_model OUT_DIR [--layers 0,1,2,3 | --num-layers 4]

Writes ``config.json`` with ``num_hidden_layers`` reduced, ``model.safetensors`` holding
the kept layers (renumbered from 0), the embeddings and the final norm — a symlink to the
full weights when the kept layers are the first N — and copies of the tokenizer and
generation files. ``vocab_size`` overrides the config's vocab size only (for
the mismatch test: validation refuses it before any weight is read).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from engine.model_loader import default_model_dir

TARGET = default_model_dir()  # the converted default model (make model)
_COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def write_self_draft(
    out: Path,
    layers: Sequence[int] = (0, 1),
    source: Path = TARGET,
    vocab_size: int | None = None,
) -> Path:
    """Write a draft checkpoint keeping ``layers`` of ``source`` (in that order) into ``out``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").unlink(missing_ok=True)  # rewriting an existing draft
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = len(layers)
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in _COPIED:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    if list(layers) == list(range(len(layers))):
        # The first N layers: link the full weights; the loader reads layers 0..N-1 and
        # ignores the rest, so nothing is copied (a deep draft would be ~0.5 GB).
        (out / "model.safetensors").symlink_to(source / "model.safetensors")
        return out
    renumber = {src: dst for dst, src in enumerate(layers)}
    tensors = {}
    with safe_open(str(source / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            match = _LAYER.match(name)
            if match is None:
                tensors[name] = handle.get_tensor(name)
            elif int(match.group(1)) in renumber:
                tensors[f"model.layers.{renumber[int(match.group(1))]}.{match.group(2)}"] = (
                    handle.get_tensor(name)
                )
    save_file(tensors, str(out / "model.safetensors"))
    return out


def swap_two_tokens(checkpoint: Path) -> None:
    """Make the checkpoint's tokenizer differ from the target's (same size): swap the ids of
    two ordinary tokens in tokenizer.json."""
    path = checkpoint / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    a, b = "hello", "world"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num-layers", type=int, default=4, help="keep the first N layers")
    group.add_argument("--layers", help="comma-separated layer indices to keep, in order")
    args = parser.parse_args()
    layers = (
        [int(x) for x in args.layers.split(",")] if args.layers else list(range(args.num_layers))
    )
    print(write_self_draft(args.out, layers))


if __name__ == "__main__":
    main()
