"""Text on the way out: incremental detokenization and stop strings."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from router.stop_strings import StopMatcher
from router.tokenizer import ModelTokenizer, default_model_dir


@pytest.fixture(scope="module")
def tok() -> ModelTokenizer:
    return ModelTokenizer.load(default_model_dir())


def stream(tok: ModelTokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok.decode)
    deltas, i = [], 0
    for size in sizes:
        deltas.append(detok.push(ids[i : i + size]))
        i += size
    deltas.append(detok.push(ids[i:]))
    deltas.append(detok.flush())
    return deltas


def test_multibyte_characters_are_never_split(tok: ModelTokenizer) -> None:
    text = "Voilà: 日本語のテキスト 🎉🚀 — naïve café, Ελληνικά, emoji 👩‍👩‍👧‍👦!"
    ids = tok.encode(text)
    deltas = stream(tok, ids, [1] * len(ids))
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    # Some tokens carry only part of a character: those produce empty deltas.
    assert "" in deltas[:-1]


def test_special_tokens_are_skipped_like_the_engine(tok: ModelTokenizer) -> None:
    ids = [*tok.encode("Hello there"), 2, *tok.encode(" again")]  # 2 = <|im_end|>
    assert "".join(stream(tok, ids, [1] * len(ids))) == tok.decode(ids) == "Hello there again"


def test_random_token_streams_match_a_full_decode(tok: ModelTokenizer) -> None:
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.facts.vocab_size) for _ in range(rng.randrange(1, 40))]
        sizes = [rng.randrange(1, 4) for _ in range(len(ids))]
        assert "".join(stream(tok, ids, sizes)) == tok.decode(ids)


def test_a_trailing_incomplete_character_is_flushed_at_the_end() -> None:
    # A toy byte-level decoder: each token is one byte.
    def decode(ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    euro = list("€".encode())
    detok = IncrementalDetokenizer(decode)
    assert detok.push(euro[:1]) == ""
    assert detok.push(euro[1:2]) == ""
    assert detok.push(euro[2:]) == "€"
    assert detok.push([0xE2]) == ""  # the stream ends mid-character
    assert detok.flush() == REPLACEMENT_CHAR
    assert detok.flush() == ""


# ---- stop strings ------------------------------------------------------------------------------


def run_stops(stops: list[str], chunks: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.push(c) for c in chunks)
    if not matcher.stopped:
        out += matcher.flush()
    return out, matcher.stopped


def test_stop_string_within_a_chunk() -> None:
    assert run_stops(["END"], ["hello END world"]) == ("hello ", True)


def test_stop_string_across_chunks_is_held_back_then_cut() -> None:
    matcher = StopMatcher(["\n\nUser:"])
    assert matcher.push("Sure.\n") == "Sure."
    assert matcher.push("\nUs") == ""
    assert matcher.push("er: next") == ""
    assert matcher.stopped


def test_a_false_alarm_is_released() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("ST") == ""
    assert matcher.push("ART") == "START"
    assert matcher.flush() == ""


def test_earliest_of_several_stops_wins() -> None:
    assert run_stops(["b", "xyz"], ["axyzb"]) == ("a", True)


def test_no_stops_passes_through() -> None:
    matcher = StopMatcher([])
    assert matcher.push("abc") == "abc" and not matcher.stopped
    with pytest.raises(ValueError):
        StopMatcher([""])


@given(
    text=st.text(alphabet="abc\n", max_size=40),
    stop=st.text(alphabet="abc\n", min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_streamed_result_equals_cutting_the_whole_text(
    text: str, stop: str, cuts: list[int]
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    expected = text.split(stop, 1)[0]
    assert run_stops([stop], chunks) == (expected, stop in text)
