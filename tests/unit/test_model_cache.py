"""common.model_cache: a model directory built once, under a lock, renamed into place."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.launch import REPO_ROOT, child_env
from common.model_cache import CONVERTED_MARKER, Stages, convert_once, is_converted

# A fake converter in its own process: slow enough that the others arrive while it builds.
_RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from common.model_cache import convert_once

    target, log = Path(sys.argv[1]), Path(sys.argv[2])

    def build(staging, stages):
        with log.open("a") as f:
            f.write("built\\n")
        with stages.step("writing"):
            time.sleep(0.5)
            (staging / "weights.bin").write_bytes(b"w" * 1000)

    path = convert_once(target, build, name="fake", steps=1)
    assert (path / "weights.bin").stat().st_size == 1000
    print("ok")
    """
)


def _fake_build(staging: Path, stages: Stages) -> None:
    with stages.step("writing"):
        (staging / "weights.bin").write_bytes(b"w")


def test_concurrent_processes_convert_once(tmp_path: Path) -> None:
    target, log = tmp_path / "models" / "fake", tmp_path / "builds.log"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(target), str(log)],
            cwd=REPO_ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [racer.communicate(timeout=60) for racer in racers]
    for racer, (out, err) in zip(racers, results, strict=True):
        assert racer.returncode == 0 and out.strip() == "ok", err
    assert log.read_text().splitlines() == ["built"]  # one build for four processes
    assert is_converted(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [".fake.lock", "fake"]
    errs = "".join(err for _, err in results)
    assert "[1/1] writing: done in" in errs  # the builder's progress
    assert "waiting" in errs  # at least one process waited for the lock


def test_failed_build_leaves_nothing_then_retry_succeeds(tmp_path: Path) -> None:
    target = tmp_path / "fake"

    def broken(staging: Path, stages: Stages) -> None:
        (staging / "half.bin").write_bytes(b"h")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        convert_once(target, broken, name="fake", steps=1, err=io.StringIO())
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".fake.lock"]  # no staging left
    assert convert_once(target, _fake_build, name="fake", steps=1, err=io.StringIO()) == target
    assert (target / "weights.bin").read_bytes() == b"w"


def test_stale_staging_and_incomplete_target_are_replaced(tmp_path: Path) -> None:
    target = tmp_path / "fake"
    stale = tmp_path / ".fake.tmp-999999"  # a builder that was killed mid-way
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"h")
    target.mkdir()  # a directory without the marker: never trusted
    (target / "old.bin").write_bytes(b"o")
    err = io.StringIO()
    convert_once(target, _fake_build, name="fake", steps=1, err=err)
    assert sorted(p.name for p in target.iterdir()) == [CONVERTED_MARKER, "weights.bin"]
    assert not stale.exists()
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("pdserve: preparing fake: converting once into")
    assert lines[1] == "pdserve: preparing fake: [1/1] writing …"
    assert lines[2].startswith("pdserve: preparing fake: [1/1] writing: done in ")
    assert lines[-1].startswith("pdserve: preparing fake: ready in ")


def test_converted_target_is_not_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / "fake"
    target.mkdir()
    (target / CONVERTED_MARKER).write_text("fake\n")

    def never(staging: Path, stages: Stages) -> None:
        raise AssertionError("rebuilt a converted model")

    assert convert_once(target, never, name="fake", steps=1) == target
    assert not (tmp_path / ".fake.lock").exists()  # the fast path takes no lock
    assert os.listdir(tmp_path) == ["fake"]


# --------------------------------------------------------------------------- entry points


def test_router_converts_the_default_model_in_a_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router (torch-free) runs ``python -m engine.prepare_model`` when the default
    model is not converted yet, then loads its tokenizer from the cache directory."""
    from engine.model_loader import ensure_default_model
    from router import tokenizer

    converted = ensure_default_model()  # the real one, to copy the tokenizer files from
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    calls: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        target = tokenizer.default_model_dir()
        target.mkdir(parents=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            (target / name).write_bytes((converted / name).read_bytes())
        (target / CONVERTED_MARKER).write_text("fake\n")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(tokenizer.subprocess, "run", fake_run)
    loaded = tokenizer.ModelTokenizer.load(None)
    assert calls == [[sys.executable, "-m", "engine.prepare_model"]]
    assert loaded.encode("hello world")
    tokenizer.ModelTokenizer.load(None)  # converted now: no second child
    assert len(calls) == 1


def test_pdserve_up_knows_when_the_config_uses_the_default_model(tmp_path: Path) -> None:
    import yaml

    from deploy.serve_config import DEFAULT_CONFIG, ServeConfig
    from deploy.up import _uses_default_model

    assert DEFAULT_CONFIG.is_file()  # package data, found next to the module
    assert _uses_default_model(ServeConfig.load(DEFAULT_CONFIG))
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    (app,) = data["applications"]
    model = str(tmp_path / "my-model")
    for pool in app["args"]["router"]["pools"]:
        pool["model_path"] = model
    for entry in app["deployments"]:
        if "user_config" in entry:
            entry["user_config"].setdefault("engine", {})["model"] = model
    custom = tmp_path / "serve.yaml"
    custom.write_text(yaml.safe_dump(data))
    assert not _uses_default_model(ServeConfig.load(custom))
