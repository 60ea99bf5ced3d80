"""The committed generated code is what `make proto` produces from the .proto files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    protos = sorted((REPO / "proto").glob("*.proto"))
    assert protos, "no .proto files"
    (tmp_path / "proto").mkdir()
    for proto in protos:
        shutil.copy(proto, tmp_path / "proto" / proto.name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--grpc_python_out=.",
            "--pyi_out=.",
            *(f"proto/{p.name}" for p in protos),
        ],
        cwd=tmp_path,
        check=True,
    )
    generated = sorted(p.name for p in (tmp_path / "proto").iterdir() if p.suffix != ".proto")
    assert generated, "protoc produced nothing"
    for name in generated:
        fresh = (tmp_path / "proto" / name).read_text()
        committed = REPO / "proto" / name
        assert committed.exists(), f"proto/{name} is not committed: run `make proto`"
        assert committed.read_text() == fresh, f"proto/{name} is stale: run `make proto`"
