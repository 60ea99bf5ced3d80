"""Request migration's pure parts: the resumed request and the client-facing usage."""

from __future__ import annotations

import pytest

from common.generation import Usage
from common.sampling import SamplingParams
from router.config import RouterConfig
from router.migration import (
    DRAINED,
    STREAM_BROKEN,
    WORKER_DIED,
    Progress,
    migration_cause,
    resume_request,
)
from router.request import PreparedRequest

SAMPLING = SamplingParams(
    max_tokens=10, temperature=0.7, top_p=0.9, top_k=5, seed=3, stop_token_ids=(2,), ignore_eos=True
)
REQUEST = PreparedRequest("r1", (1, 2, 3), SAMPLING, ("END",))


def test_the_resumed_request_extends_the_prompt_and_shrinks_max_tokens() -> None:
    resumed = resume_request(REQUEST, [40, 41, 42, 43])
    assert resumed.token_ids == (1, 2, 3, 40, 41, 42, 43)
    assert resumed.sampling.max_tokens == 6
    assert resumed.request_id == "r1" and resumed.stop == ("END",)
    # Everything else about sampling is the original's, the seed included.
    assert resumed.sampling == SamplingParams(
        max_tokens=6, temperature=0.7, top_p=0.9, top_k=5, seed=3, stop_token_ids=(2,),
        ignore_eos=True,
    )  # fmt: skip
    assert REQUEST.token_ids == (1, 2, 3)  # the original is untouched


def test_nothing_left_to_generate_is_no_resumption() -> None:
    assert resume_request(REQUEST, list(range(9))).sampling.max_tokens == 1
    with pytest.raises(ValueError, match="spent"):
        resume_request(REQUEST, list(range(10)))


def test_usage_counts_the_original_prompt_every_token_once_and_the_first_cache_hit() -> None:
    progress = Progress(prompt_tokens=3)
    # First attempt: the worker's usage is the client's; its cached tokens are remembered.
    assert progress.usage(Usage(3, 1, 2)) == Usage(3, 1, 2)
    assert progress.usage(None) is None
    progress.sent.extend([40, 41, 42])
    progress.resume("d0", now=10.0)
    assert (progress.migrations, progress.resumed_from, progress.failed_at) == (1, 3, 10.0)
    # The resumed worker saw a 6-token prompt (3 of them cached) and generated 1, then 4.
    assert progress.usage(Usage(6, 1, 5)) == Usage(3, 4, 2)
    progress.sent.extend([43, 44])
    progress.resume("d1", now=11.0)  # a second break: the gap still counts from the first
    assert (progress.resumed_from, progress.failed_at) == (5, 10.0)
    assert progress.failed_workers == {"d0", "d1"}
    assert progress.usage(Usage(8, 5, 8)) == Usage(3, 10, 2)


def test_causes_come_from_the_status_and_whether_the_worker_was_draining() -> None:
    for code in ("UNAVAILABLE", "CANCELLED"):
        assert migration_cause(code, draining=False) == WORKER_DIED
        assert migration_cause(code, draining=True) == DRAINED
    assert migration_cause("UNKNOWN", draining=False) == STREAM_BROKEN
    for code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "INTERNAL", "DEADLINE_EXCEEDED"):
        assert migration_cause(code, draining=False) is None


def test_max_migrations_is_configured_and_checked() -> None:
    assert RouterConfig().max_migrations == 3
    assert RouterConfig.from_mapping({"max_migrations": 0}).max_migrations == 0
    for bad in (-1, 1.5, "two"):
        with pytest.raises(ValueError, match="max_migrations"):
            RouterConfig.from_mapping({"max_migrations": bad})
