"""API keys: the key file, the bearer check, and that a key set never prints its keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.auth import ApiKeys, bearer_token, load_keys


def test_key_file_skips_blank_and_comment_lines(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team a\nsk-one\n\n   sk-two  \n# sk-old\n")
    keys = ApiKeys.from_file(path)
    assert len(keys) == 2
    assert keys.check("sk-one") and keys.check("sk-two")
    assert not keys.check("sk-old") and not keys.check("# sk-old") and not keys.check("")
    assert not keys.check(None) and not keys.check("sk-on") and not keys.check("sk-one ")
    assert "sk-one" not in repr(keys) and "sk-one" not in str(keys)
    assert load_keys(None) is None and load_keys(str(path)) is not None


def test_an_empty_key_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no API keys"):
        ApiKeys.from_file(path)


def test_bearer_header() -> None:
    keys = ApiKeys(["sk-1"])
    assert bearer_token("Bearer sk-1") == "sk-1" and bearer_token("bearer  sk-1 ") == "sk-1"
    assert bearer_token("Basic sk-1") is None and bearer_token("Bearer ") is None
    assert bearer_token(None) is None
    assert keys.check_authorization("Bearer sk-1")
    assert not keys.check_authorization("sk-1") and not keys.check_authorization(None)
