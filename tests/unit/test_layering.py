"""The layering is a test: import-linter's contracts (``[tool.importlinter]`` in
pyproject.toml) hold on the tree, and an upward import breaks them.

import-linter (over grimp) reads every import statement, lazy ones in functions too, and
follows them transitively, so "the router never imports torch" means no chain of imports
reaches torch. The negative cases copy the packages into a temporary tree, add one upward
import, and check that the contract named for it fails there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _root_packages() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return config["tool"]["importlinter"]["root_packages"]


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(root / "pyproject.toml")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_tree_keeps_its_layers() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layers")
    shutil.copy(REPO / "pyproject.toml", root)
    for package in _root_packages():
        shutil.copytree(
            REPO / package,
            root / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.md", "*.yaml", "*.proto", "results"),
        )
    return root


@pytest.mark.parametrize(
    ("module", "upward_import", "contract"),
    [
        ("common/hashing.py", "import deploy.cli", "layers"),
        ("engine/scheduler.py", "import kv_transfer.sender", "layers"),
        ("kv_transfer/sender.py", "import decode_worker.decode", "layers"),
        ("common/hashing.py", "import proto.worker_pb2", "common is torch-free"),
        ("router/policies.py", "import engine.scheduler", "the router decides"),
        ("router/policies.py", "import torch", "the router decides"),
        ("deploy/cli.py", "import benchmarks", "nothing imports benchmarks"),
    ],
)
def test_an_upward_import_breaks_a_contract(
    tree_copy: Path, module: str, upward_import: str, contract: str
) -> None:
    path = tree_copy / module
    original = path.read_text()
    path.write_text(f"{original}\n{upward_import}  # an upward import\n")
    try:
        result = _lint(tree_copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if " BROKEN" in line]
    assert any(contract in line for line in broken), result.stdout
