"""Request migration's pure parts: the resumed request and the client-facing usage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import grpc
import pytest
from grpc.aio import Metadata

from common.generation import FinishReason, Usage
from common.sampling import SamplingParams
from common.worker_info import BlockGeometry, WorkerInfo, WorkerRole
from proto import worker_pb2
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
from router.routing import Decision
from router.snapshot import WorkerView
from router.stream import DecodeStreamer, WorkerDelta
from router.tracker import WorkerTracker

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


# ---- the end of a reply, as the worker dies: DecodeStreamer over a fake stub ----------------

EOS = 0  # the model's EOS in these scripts; the worker sends it with its finish reason


@dataclass
class _Call:
    """One fake ``Decode`` call: the scripted responses, then ``then`` (an error) if set."""

    responses: list[worker_pb2.DecodeResponse]
    then: grpc.StatusCode | None
    cancelled: bool = False

    def __aiter__(self) -> AsyncIterator[worker_pb2.DecodeResponse]:
        return self._run()

    async def _run(self) -> AsyncIterator[worker_pb2.DecodeResponse]:
        for response in self.responses:
            yield response
        if self.then is not None:
            raise grpc.aio.AioRpcError(self.then, Metadata(), Metadata(), "worker died")

    def cancel(self) -> bool:
        self.cancelled = True
        return True


@dataclass
class _Channels:
    """What DecodeStreamer uses of a ChannelPool: per decode worker address, its scripts."""

    scripts: dict[str, list[_Call]]
    requests: list[tuple[str, worker_pb2.DecodeRequest]] = field(default_factory=list)
    metadata: tuple[tuple[str, str], ...] = ()

    def decode_stub(self, address: str) -> SimpleNamespace:
        def decode(request: worker_pb2.DecodeRequest, **_: object) -> _Call:
            self.requests.append((address, request))
            return self.scripts[address].pop(0)

        return SimpleNamespace(Decode=decode)

    async def probe(self, address: str, timeout_s: float = 1.0) -> bool:
        return False


def _msg(
    tokens: list[int], finish: int = 0, usage: Usage | None = None
) -> worker_pb2.DecodeResponse:
    response = worker_pb2.DecodeResponse(token_ids=tokens, finish_reason=finish)
    if usage is not None:
        response.usage.CopyFrom(
            worker_pb2.Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
            )
        )
    return response


def _view(worker_id: str) -> WorkerView:
    geometry = BlockGeometry("m", "float32", 16, 30, 3, 64, 256)
    info = WorkerInfo(worker_id, WorkerRole.DECODE, "default", "m", worker_id, None, geometry)
    return WorkerView(info, None)


def _plan(avoid: frozenset[str], refused: frozenset[str]) -> Decision:
    decode = next(w for w in ("d0", "d1", "d2") if w not in avoid | refused)
    return Decision("default", "test", None, _view(decode), 0)


def _run(
    channels: _Channels, request: PreparedRequest, max_migrations: int = 3
) -> tuple[list[WorkerDelta], list[str]]:
    migrations: list[str] = []
    streamer = DecodeStreamer(
        channels,  # type: ignore[arg-type]
        WorkerTracker(),
        max_migrations=max_migrations,
        on_migration=lambda pool, cause: migrations.append(cause),
    )

    async def main() -> list[WorkerDelta]:
        out = [d async for d in streamer.stream(request, _plan, None)]
        await streamer.close()
        return out

    return asyncio.run(main()), migrations


GREEDY = PreparedRequest("g", (1, 2, 3), SamplingParams(max_tokens=6, stop_token_ids=(9,)), ())
DIED = grpc.StatusCode.UNAVAILABLE


def test_a_finish_that_arrives_as_the_worker_dies_ends_the_stream_once() -> None:
    # EOS and its finish reason came in the last message; the worker died right after.
    last = _msg([EOS], worker_pb2.FINISH_REASON_STOP, Usage(3, 3, 0))
    channels = _Channels({"d0": [_Call([_msg([5]), _msg([6]), last], then=DIED)], "d1": []})
    deltas, migrations = _run(channels, GREEDY)
    assert [t for d in deltas for t in d.token_ids] == [5, 6, EOS]
    assert [d.finish_reason for d in deltas] == [None, None, FinishReason.STOP]
    assert [a for a, _ in channels.requests] == ["d0"] and migrations == []


def test_a_stop_token_sent_before_the_worker_died_is_not_resumed_into_more_tokens() -> None:
    # The stop token id reached the client, its finish did not: the reply is over anyway.
    channels = _Channels({"d0": [_Call([_msg([5]), _msg([9])], then=DIED)], "d1": []})
    deltas, migrations = _run(channels, GREEDY)
    assert [t for d in deltas for t in d.token_ids] == [5, 9]
    finishes = [d.finish_reason for d in deltas if d.finish_reason is not None]
    assert finishes == [FinishReason.STOP]
    assert deltas[-1].usage == Usage(3, 2, 0)
    assert len(channels.requests) == 1 and migrations == []


def test_every_token_sent_finishes_even_past_the_migration_limit() -> None:
    channels = _Channels({"d0": [_Call([_msg([5, 6, 7]), _msg([8, 10, 11])], then=DIED)]})
    deltas, migrations = _run(channels, GREEDY, max_migrations=0)
    assert [t for d in deltas for t in d.token_ids] == [5, 6, 7, 8, 10, 11]
    assert [d.finish_reason for d in deltas][-1] is FinishReason.LENGTH
    assert len(channels.requests) == 1 and migrations == []


def test_a_break_mid_reply_resumes_once_with_the_tokens_sent() -> None:
    rest = _msg([8, EOS], worker_pb2.FINISH_REASON_STOP, Usage(5, 2, 5))
    channels = _Channels(
        {"d0": [_Call([_msg([5]), _msg([6])], then=DIED)], "d1": [_Call([rest], then=DIED)]}
    )
    deltas, migrations = _run(channels, GREEDY)
    assert [t for d in deltas for t in d.token_ids] == [5, 6, 8, EOS]
    assert [d.finish_reason for d in deltas].count(FinishReason.STOP) == 1
    assert deltas[-1].usage == Usage(3, 4, 0)  # the original prompt, every token once
    (first, _), (second, resumed) = channels.requests
    assert (first, second) == ("d0", "d1")
    assert list(resumed.token_ids) == [1, 2, 3, 5, 6] and resumed.sampling.max_tokens == 4
    assert migrations == [WORKER_DIED]
