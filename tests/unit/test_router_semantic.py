"""SemanticRouter with a fake embedder: route choice, thresholds, pools, caching."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from router.config import SemanticConfig, SemanticRoute
from router.semantic import SemanticRouter

VOCAB = ["python", "code", "bug", "function", "hello", "weather", "how", "are", "you"]


class BagOfWords:
    """Normalised word-count vectors over a tiny vocabulary; counts its calls."""

    def __init__(self) -> None:
        self.texts_embedded = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.texts_embedded += len(texts)
        rows = []
        for text in texts:
            words = text.lower().replace("?", "").split()
            unknown = sum(w not in VOCAB for w in words)
            v = np.array([*(words.count(w) for w in VOCAB), unknown], dtype=np.float32) + 1e-3
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows)


def make(
    threshold: float = 0.5, cache_size: int = 16, chitchat_threshold: float = 0.6
) -> tuple[SemanticRouter, BagOfWords]:
    config = SemanticConfig(
        routes=(
            SemanticRoute("code", "coder", ("python function bug", "code bug")),
            SemanticRoute("chitchat", "chat", ("hello how are you", "weather"), chitchat_threshold),
        ),
        threshold=threshold,
        cache_size=cache_size,
    )
    embedder = BagOfWords()
    router = SemanticRouter(config, embedder)
    router.prepare()
    return router, embedder


def test_nearest_route_above_threshold_wins() -> None:
    router, _ = make()
    match = router.classify("my python function has a bug")
    assert match is not None and (match.route, match.pool) == ("code", "coder")
    assert match.score > 0.5
    match = router.classify("hello how are you")
    assert match is not None and match.route == "chitchat" and match.score > 0.99


def test_nothing_near_enough_is_no_match() -> None:
    router, _ = make()
    assert router.classify("completely unrelated words") is None


def test_per_route_threshold() -> None:
    # "weather python" is nearer chitchat (0.71 vs 0.41), but below chitchat's own threshold.
    router, _ = make(threshold=0.0, chitchat_threshold=0.9)
    match = router.classify("weather python")
    assert match is not None and match.route == "code"
    router, _ = make(threshold=0.0, chitchat_threshold=0.6)
    match = router.classify("weather python")
    assert match is not None and match.route == "chitchat"


def test_routes_are_restricted_to_the_allowed_pools() -> None:
    router, _ = make()
    assert router.classify("python code bug", pools={"chat"}) is None
    assert router.classify("hello how are you", pools={"chat", "other"}) is not None


def test_identical_prompts_are_embedded_once() -> None:
    router, embedder = make(cache_size=2)
    before = embedder.texts_embedded
    for _ in range(3):
        router.classify("python code")
    assert embedder.texts_embedded == before + 1
    router.classify("a")
    router.classify("b")  # evicts "python code" (LRU, size 2)
    router.classify("python code")
    assert embedder.texts_embedded == before + 4
    assert router.embeddings_computed == 4


def test_async_classification_runs_off_the_loop() -> None:
    router, _ = make()

    async def scenario() -> None:
        first = await router.aclassify("python bug")
        second = await router.aclassify("python bug")
        assert first == second and first is not None and first.route == "code"

    asyncio.run(scenario())
    router.close()
    assert router.embeddings_computed == 1


def test_no_routes_means_no_match() -> None:
    router = SemanticRouter(SemanticConfig(), BagOfWords())
    router.prepare()
    assert router.classify("anything") is None
