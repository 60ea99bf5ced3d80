"""Scheduler driven by hand-built model outputs: no torch, no model.

``run_step`` plays the model: it checks that every scheduled chunk has KV slots, records
which token ids were written into which slot, checks that the KV a chunk attends to
(positions before ``start``) holds exactly the sequence's tokens, and samples a
deterministic token per sequence and position.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from common.generation import FinishReason
from common.sampling import SamplingParams
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.prefill_policy import PrefillPolicy
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus

EOS = 0
Sampler = Callable[[Sequence], int]


def never_eos(seq: Sequence) -> int:
    """A token that depends only on the request and position, as greedy decoding would."""
    return 100 + (seq.num_tokens * 7 + len(seq.request_id)) % 50


class Harness:
    def __init__(
        self,
        num_blocks: int = 64,
        block_size: int = 16,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 64,
        max_model_len: int = 1024,
        **engine: int,
    ) -> None:
        config = EngineConfig(
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            **engine,  # type: ignore[arg-type]
        )
        self.bm = BlockManager(num_blocks, block_size)
        self.sched = Scheduler(config, self.bm, frozenset({EOS}), max_model_len)
        self.config = config
        self.kv: dict[int, int] = {}  # slot -> token id whose KV was written there
        self.arrivals = 0

    def add(self, rid: str, prompt: list[int], **params: object) -> Sequence:
        seq = Sequence(rid, prompt, SamplingParams(**params), arrival=self.arrivals)
        self.arrivals += 1
        self.sched.add(seq)
        return seq

    def slot(self, seq: Sequence, pos: int) -> int:
        size = self.bm.block_size
        return seq.block_table[pos // size] * size + pos % size

    def run_step(self, sample: Sampler = never_eos) -> tuple[SchedulerOutput, list[Sequence]]:
        out = self.sched.schedule()
        assert out.num_batched_tokens <= self.config.max_num_batched_tokens
        assert out.num_batched_tokens == sum(c.num_tokens for c in out.scheduled)
        assert self.sched.num_running <= self.config.max_num_seqs
        sampled: dict[str, int] = {}
        for chunk in out.scheduled:
            seq, tokens = chunk.seq, chunk.seq.all_token_ids
            assert chunk.start == seq.num_computed_tokens and chunk.num_tokens > 0
            assert len(seq.block_table) * self.bm.block_size >= chunk.start + chunk.num_tokens
            for pos in range(chunk.start):  # the context this chunk attends to
                assert self.kv[self.slot(seq, pos)] == tokens[pos], (seq.request_id, pos)
            for pos in range(chunk.start, chunk.start + chunk.num_tokens):
                self.kv[self.slot(seq, pos)] = tokens[pos]
            assert chunk.samples == (chunk.start + chunk.num_tokens == seq.num_tokens)
            if chunk.samples:
                sampled[seq.request_id] = sample(seq)
        return out, self.sched.update_from_output(out, sampled)

    def run_to_completion(self, sample: Sampler = never_eos, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                assert self.bm.num_used_blocks == 0
                return
            self.run_step(sample)
        raise AssertionError("scheduler made no progress")


def test_prefix_hit_across_sequences() -> None:
    h = Harness(block_size=16, max_num_batched_tokens=256)
    shared = list(range(1000, 1200))  # 200 tokens
    first = h.add("first", shared, max_tokens=2)
    h.run_to_completion()
    assert first.finish_reason is FinishReason.LENGTH

    second = h.add("second", [*shared, 5, 6, 7])
    out, _ = h.run_step()
    (chunk,) = out.scheduled
    assert second.num_cached_tokens == 192
    assert (chunk.start, chunk.num_tokens, chunk.samples) == (192, 11, True)


def test_chunked_prefill_of_a_long_prompt_shares_the_budget_with_decodes() -> None:
    h = Harness(block_size=16, max_num_batched_tokens=32)
    short = h.add("short", [1, 2, 3], max_tokens=20)
    h.run_step()  # short prefills and samples its first token
    long = h.add("long", list(range(10, 110)), max_tokens=3)  # 100 tokens

    chunks = []
    for _ in range(4):
        out, _ = h.run_step()
        by_id = {c.seq.request_id: c for c in out.scheduled}
        assert by_id["short"].num_tokens == 1  # the decode is never starved
        chunks.append((by_id["long"].start, by_id["long"].num_tokens, by_id["long"].samples))
    assert chunks == [(0, 31, False), (31, 31, False), (62, 31, False), (93, 7, True)]
    assert len(long.output_token_ids) == 1
    assert len(short.output_token_ids) == 5
    h.run_to_completion()


def test_fifo_admission_does_not_skip_a_blocked_head() -> None:
    h = Harness(num_blocks=8, block_size=4, max_num_batched_tokens=64)
    hog = h.add("hog", list(range(1, 21)), max_tokens=3)  # 20 tokens: 5 blocks, then 6
    h.run_step()
    big = h.add("big", list(range(30, 46)), max_tokens=2)  # needs 4 blocks; 2 or 3 left
    small = h.add("small", [7], max_tokens=2)  # would fit, but must wait behind "big"
    while hog.status is SequenceStatus.RUNNING:
        out, _ = h.run_step()
        assert big.status is SequenceStatus.WAITING and small.status is SequenceStatus.WAITING
        assert [c.seq for c in out.scheduled] == [hog]
    out, _ = h.run_step()
    assert [c.seq for c in out.scheduled] == [big, small]
    h.run_to_completion()


def test_max_num_seqs_caps_the_running_batch() -> None:
    h = Harness(max_num_seqs=2)
    seqs = [h.add(f"r{i}", [i + 1] * 5, max_tokens=4) for i in range(4)]
    out, _ = h.run_step()
    assert [c.seq for c in out.scheduled] == seqs[:2]
    assert h.sched.num_waiting == 2
    h.run_to_completion()
    assert all(len(seq.output_token_ids) == 4 for seq in seqs)


def test_preemption_by_recompute_keeps_outputs_and_finishes_the_same() -> None:
    def outputs(num_blocks: int) -> tuple[list[list[int]], list[str]]:
        h = Harness(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=32)
        seqs = [h.add(f"s{i}", [10 * i + j for j in range(1, 7)], max_tokens=12) for i in range(3)]
        preempted: list[str] = []
        for _ in range(500):
            if not h.sched.has_unfinished():
                break
            out, _ = h.run_step()
            for rid in out.preempted:
                victim = next(seq for seq in seqs if seq.request_id == rid)
                assert victim.status is SequenceStatus.WAITING and victim.block_table == []
                assert victim.num_computed_tokens == 0 and victim.output_token_ids
            preempted += out.preempted
            h.bm.check_invariants(live=seqs)
        assert h.bm.num_used_blocks == 0
        return [seq.output_token_ids for seq in seqs], preempted

    roomy, none = outputs(num_blocks=64)
    tight, preempted = outputs(num_blocks=8)  # 3 seqs x up to 5 blocks do not fit in 8
    assert none == []
    assert preempted and preempted[0] == "s2"  # the most recent arrival goes first
    assert tight == roomy
    assert all(len(tokens) == 12 for tokens in tight)


def test_preempted_seq_goes_to_the_front_and_re_prefills_its_outputs() -> None:
    h = Harness(num_blocks=4, block_size=4, max_num_batched_tokens=16)
    a = h.add("a", [1, 2, 3, 4, 5, 6, 7], max_tokens=6)  # 2 blocks, grows to a 3rd
    b = h.add("b", [11, 12, 13, 14, 15, 16, 17], max_tokens=6)
    h.run_step()  # both prefilled: all 4 blocks in use
    c = h.add("c", [21], max_tokens=1)
    out, _ = h.run_step()  # a and b decode position 7; still within their 2nd block
    out, _ = h.run_step()  # a needs a 3rd block for position 8: b (newest) is preempted
    assert out.preempted == ["b"]
    assert [chunk.seq for chunk in out.scheduled] == [a]
    assert list(h.sched._waiting) == [b, c]
    generated = list(b.output_token_ids)
    assert len(generated) == 2

    while b.status is not SequenceStatus.RUNNING:
        out, _ = h.run_step()
    chunk = next(chunk for chunk in out.scheduled if chunk.seq is b)
    assert b.output_token_ids[:2] == generated
    # b's head block survived in the prefix cache (its tail was evicted first), so the
    # re-prefill starts after it; num_cached_tokens still reports the first admission's 0.
    assert chunk.start == 4 and b.num_cached_tokens == 0
    assert chunk.start + chunk.num_tokens == 9 and chunk.samples  # prompt + both outputs
    h.run_to_completion()
    assert len(a.output_token_ids) == len(b.output_token_ids) == 6


def test_running_seq_preempts_itself_when_it_is_the_newest() -> None:
    h = Harness(num_blocks=3, block_size=4, max_num_batched_tokens=16)
    a = h.add("a", [1, 2, 3, 4, 5, 6], max_tokens=2)  # 2 blocks; stays within them
    b = h.add("b", [11, 12, 13, 14], max_tokens=3)  # 1 block, then needs a 2nd
    h.run_step()
    out, finished = h.run_step()  # b finds no block and is itself the newest arrival
    assert out.preempted == ["b"] and [c.seq for c in out.scheduled] == [a]
    assert finished == [a]
    h.run_to_completion()
    assert len(b.output_token_ids) == 3


def test_abort_frees_blocks_everywhere() -> None:
    h = Harness(num_blocks=16, block_size=4)
    running = h.add("running", list(range(1, 10)), max_tokens=50)
    h.run_step()
    waiting_one = h.add("waiting", [1, 2, 3], max_tokens=5)
    assert h.bm.num_used_blocks > 0

    assert h.sched.abort("running") is running
    assert running.finish_reason is FinishReason.ABORT and running.is_finished
    assert running.block_table == []
    assert h.sched.abort("waiting") is waiting_one
    assert h.sched.abort("running") is None and h.sched.abort("nope") is None
    assert not h.sched.has_unfinished()
    assert h.bm.num_used_blocks == 0
    h.bm.check_invariants(live=[])


def test_abort_while_the_step_runs_is_ignored_by_update() -> None:
    h = Harness()
    seq = h.add("x", [1, 2, 3], max_tokens=5)
    out = h.sched.schedule()
    h.sched.abort("x")
    assert h.sched.update_from_output(out, {"x": 42}) == []
    assert seq.output_token_ids == [] and h.bm.num_used_blocks == 0
    h.bm.check_invariants(live=[])


def test_applying_an_output_twice_is_rejected() -> None:
    h = Harness()
    h.add("x", [1, 2, 3], max_tokens=5)
    out = h.sched.schedule()
    h.sched.update_from_output(out, {"x": 42})
    with pytest.raises(ValueError):
        h.sched.update_from_output(out, {"x": 42})


@pytest.mark.parametrize(
    ("params", "tokens", "reason", "num_outputs"),
    [
        ({"max_tokens": 10}, [5, 6, EOS, 7], FinishReason.STOP, 3),
        ({"max_tokens": 10, "ignore_eos": True}, [EOS] * 10, FinishReason.LENGTH, 10),
        ({"max_tokens": 10, "stop_token_ids": (9,)}, [5, 9, 6], FinishReason.STOP, 2),
        ({"max_tokens": 4}, [5, 6, 7, 8, 9], FinishReason.LENGTH, 4),
        ({"max_tokens": 100}, [5] * 100, FinishReason.LENGTH, 20 - 3),  # max_model_len
    ],
)
def test_stop_conditions(
    params: dict[str, object], tokens: list[int], reason: FinishReason, num_outputs: int
) -> None:
    h = Harness(num_blocks=16, block_size=4, max_model_len=20)
    seq = h.add("x", [1, 2, 3], **params)
    script = iter(tokens)
    finished: list[Sequence] = []
    while not finished:
        _, finished = h.run_step(lambda _seq: next(script))
    assert finished == [seq]
    assert seq.finish_reason is reason
    assert len(seq.output_token_ids) == num_outputs
    assert not h.sched.has_unfinished() and h.bm.num_used_blocks == 0


def test_add_rejects_prompts_that_can_never_run() -> None:
    h = Harness(num_blocks=4, block_size=4, max_model_len=64)  # the cache holds 16 tokens
    for rid, prompt in [("too-long", list(range(64))), ("no-room", [1] * 17), ("empty", [])]:
        with pytest.raises(ValueError):
            h.add(rid, prompt)
    seq = h.add("fills-the-cache", [1] * 16, max_tokens=5)
    with pytest.raises(ValueError):
        h.add("fills-the-cache", [1])  # duplicate id
    h.run_to_completion()
    assert seq.finish_reason is FinishReason.LENGTH and len(seq.output_token_ids) == 1


def test_a_seq_outgrowing_the_whole_cache_stops_instead_of_thrashing() -> None:
    h = Harness(num_blocks=4, block_size=4, max_model_len=64)
    seq = h.add("grower", [1, 2, 3], max_tokens=50)
    h.run_to_completion(max_steps=100)
    # Its last decode filled slot 16 of 16; a further token would have had no KV slot.
    assert seq.finish_reason is FinishReason.LENGTH
    assert seq.num_tokens == 17 and len(seq.output_token_ids) == 14


# ---- long prefills do not hold up short arrivals (long_prefill_token_threshold) ---------


def chunk_sizes(out: SchedulerOutput) -> dict[str, int]:
    return {c.seq.request_id: c.num_tokens for c in out.scheduled}


def test_prefill_policy_caps_only_long_prefills() -> None:
    off, on = PrefillPolicy(0), PrefillPolicy(32)
    assert not off.is_long(10_000) and off.first_chunk(1000, 64) == 64
    assert off.may_admit(1000, long_in_progress=True)
    assert on.is_long(33) and not on.is_long(32) and not on.is_long(1)  # decodes never are
    assert on.first_chunk(1000, 64) == 32 and on.first_chunk(1000, 20) == 20
    assert on.first_chunk(30, 64) == 30  # short: whole, as the budget allows
    assert on.may_admit(1000, long_in_progress=False) and on.may_admit(32, long_in_progress=True)
    assert not on.may_admit(33, long_in_progress=True)


@pytest.mark.parametrize("threshold", [0, 32])
def test_short_arrival_runs_beside_a_long_prefill(threshold: int) -> None:
    h = Harness(block_size=16, max_num_batched_tokens=64, long_prefill_token_threshold=threshold)
    h.add("decoder", [1, 2, 3], max_tokens=40)
    h.run_step()
    long = h.add("long", list(range(10, 410)), max_tokens=1)  # 400 tokens
    h.run_step()
    short = h.add("short", list(range(500, 520)), max_tokens=1)  # 20 tokens
    steps_to_short, long_chunks = 0, []
    while short.status is not SequenceStatus.FINISHED:
        out, _ = h.run_step()
        steps_to_short += 1
        sizes = chunk_sizes(out)
        assert sizes["decoder"] == 1  # decodes keep their token every step
        long_chunks.append(sizes.get("long", 0))
    if threshold:
        assert steps_to_short == 1  # prefilled (and first token sampled) in the next step
        assert long_chunks == [64 - 1 - 20]  # the long prompt gave up only what short took
        assert long.num_computed_tokens == 64 - 1 + 43  # and still progressed
    else:  # strict FIFO: the short prompt waits for every chunk of the long one
        assert steps_to_short == -(-(400 - 63) // 63) and long.is_finished
    h.run_to_completion()


def test_a_lone_long_prefill_is_chunked_exactly_as_without_the_policy() -> None:
    def schedule(threshold: int) -> list[dict[str, int]]:
        h = Harness(max_num_batched_tokens=64, long_prefill_token_threshold=threshold)
        h.add("a", [3] * 10, max_tokens=30)
        h.run_step()
        h.add("long", list(range(10, 310)), max_tokens=3)
        return [chunk_sizes(h.run_step()[0]) for _ in range(8)]

    assert schedule(threshold=16) == schedule(threshold=0)


def test_long_prompts_start_fifo_one_at_a_time_and_shorts_pass_them() -> None:
    h = Harness(num_blocks=128, max_num_batched_tokens=64, long_prefill_token_threshold=16)
    first = h.add("first", [1] * 150, max_tokens=1)
    second = h.add("second", [2] * 150, max_tokens=1)
    short = h.add("short", [3] * 10, max_tokens=1)
    out, _ = h.run_step()
    # first gets the budget that short leaves; second does not start beside first.
    assert chunk_sizes(out) == {"first": 54, "short": 10}
    while first.status is not SequenceStatus.FINISHED:
        out, _ = h.run_step()
        assert short.is_finished and chunk_sizes(out)["first"] > 0
        if not first.is_finished:
            assert second.status is SequenceStatus.WAITING
    # The step that finished first's prefill gave second the leftover, as FIFO would.
    assert chunk_sizes(out) == {"first": 150 - 54 - 64, "second": 64 - 32}
    h.run_to_completion()


def test_a_stream_of_short_arrivals_does_not_starve_the_long_prefill() -> None:
    h = Harness(num_blocks=256, max_num_batched_tokens=64, long_prefill_token_threshold=16)
    long = h.add("long", list(range(10, 330)), max_tokens=1)  # 320 tokens
    h.run_step()  # alone: the whole budget
    steps = 0
    while not long.is_finished:
        for i in range(4):  # 4 x 15 tokens a step: the shorts alone would fill the budget
            h.add(f"s{steps}-{i}", [steps % 50 + 100 + i] * 15, max_tokens=1)
        out, _ = h.run_step()
        steps += 1
        sizes = chunk_sizes(out)
        assert sizes["long"] >= 16 and len(sizes) > 1  # both kinds progress every step
    assert steps <= -(-(320 - 64) // 16)
    h.run_to_completion()


def test_a_long_prompt_with_a_cached_prefix_counts_as_short() -> None:
    h = Harness(num_blocks=128, max_num_batched_tokens=64, long_prefill_token_threshold=16)
    shared = list(range(1000, 1160))  # 160 tokens, 10 full blocks
    h.add("warm", shared, max_tokens=1)
    h.run_to_completion()
    h.add("long", list(range(10, 410)), max_tokens=1)
    h.run_step()
    follow_up = h.add("follow-up", [*shared, 7, 8], max_tokens=1)  # 2 tokens to compute
    uncached = h.add("uncached", list(range(2000, 2100)), max_tokens=1)  # long: waits
    out, _ = h.run_step()
    assert chunk_sizes(out) == {"long": 64 - 2, "follow-up": 2}
    assert follow_up.is_finished and uncached.status is SequenceStatus.WAITING
    h.run_to_completion()


PREFIXES = [(), (1, 2, 3, 4), (1, 2, 3, 4, 5, 6, 7, 8), (9, 9, 9)]


class RandomWorkload(RuleBasedStateMachine):
    """Random add / step / abort interleavings against a tiny cache."""

    threshold = 0  # long_prefill_token_threshold

    def __init__(self) -> None:
        super().__init__()
        # 4 seqs of up to 32 KV tokens (8 blocks, the whole cache) each: preemption is common,
        # and some seqs stop only because they outgrow the cache.
        self.h = Harness(
            num_blocks=8,
            block_size=4,
            max_num_seqs=4,
            max_num_batched_tokens=8,
            max_model_len=64,
            long_prefill_token_threshold=self.threshold,
        )
        self.live: dict[str, Sequence] = {}
        self.next_id = 0

    def sample(self, seq: Sequence) -> int:
        return (seq.num_tokens * 5 + int(seq.request_id)) % 29  # EOS (0) about 1 in 29

    @rule(
        prefix=st.sampled_from(PREFIXES),
        tail=st.lists(st.integers(1, 4), max_size=14),
        max_tokens=st.integers(1, 16),
    )
    def add(self, prefix: tuple[int, ...], tail: list[int], max_tokens: int) -> None:
        prompt = [*prefix, *tail] or [1]
        rid = str(self.next_id)
        self.next_id += 1
        self.live[rid] = self.h.add(rid, prompt, max_tokens=max_tokens)

    @rule(steps=st.integers(1, 4))
    def step(self, steps: int) -> None:
        for _ in range(steps):
            out, finished = self.h.run_step(self.sample)
            for seq in finished:
                assert seq.finish_reason is not None and seq.block_table == []
                assert len(seq.output_token_ids) <= seq.params.max_tokens
                del self.live[seq.request_id]
            if self.live and not out.preempted:
                assert out.scheduled, "work was waiting but nothing was scheduled"
            self.h.bm.check_invariants(live=self.live.values())

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        assert self.h.sched.abort(rid) is self.live.pop(rid)

    @rule()
    def drain(self) -> None:
        self.h.run_to_completion(self.sample)
        self.live.clear()

    @invariant()
    def consistent(self) -> None:
        self.h.bm.check_invariants(live=self.live.values())
        assert self.h.sched.num_waiting + self.h.sched.num_running == len(self.live)

    def teardown(self) -> None:
        for rid in list(self.live):
            self.h.sched.abort(rid)
        assert self.h.bm.num_used_blocks == 0
        self.h.bm.check_invariants(live=[])


class RandomWorkloadLongPrefills(RandomWorkload):
    threshold = 3  # most prompts are long: capping, passing over and top-ups all happen


for machine in (RandomWorkload, RandomWorkloadLongPrefills):
    machine.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
test_random_workload = RandomWorkload.TestCase
test_random_workload_long_prefills = RandomWorkloadLongPrefills.TestCase


def test_blocks_landed_by_a_transfer_join_the_prefix_cache() -> None:
    # The decode side of disaggregation: a prompt's KV lands in reserved blocks, then
    # add_prefilled. Its full blocks are cached with their hashes and announced, so a later
    # prompt with that prefix, prefilled on this engine, reuses them.
    from common.hashing import block_hashes
    from common.kv_events import BlockStored

    h = Harness(block_size=16, max_num_batched_tokens=256)
    prompt = list(range(1000, 1040))  # 40 tokens: 2 full blocks + 8
    blocks = h.bm.allocate_blocks(3)
    params = SamplingParams(max_tokens=2)
    landed = Sequence("landed", prompt, params, 0, output_token_ids=[150], block_table=[*blocks])
    for pos, token in enumerate(prompt):  # what the transfer wrote
        h.kv[h.slot(landed, pos)] = token
    assert h.sched.add_prefilled(landed) is False
    stored = [e for e in h.bm.take_events() if isinstance(e, BlockStored)]
    assert [e.block_hash for e in stored] == block_hashes(prompt, 16)[:2]
    assert [e.block_id for e in stored] == blocks[:2]
    h.run_to_completion()

    again = h.add("again", [*prompt[:32], 7, 8, 9])
    out, _ = h.run_step()
    (chunk,) = out.scheduled
    assert again.num_cached_tokens == 32 and again.block_table[:2] == blocks[:2]
    assert (chunk.start, chunk.num_tokens) == (32, 3)
