"""Conditional disaggregation: the pure rule, its YAML section, and decide() applying it."""

from __future__ import annotations

import pytest

from common.worker_info import WorkerRole
from router.config import RouterConfig
from router.disagg_policy import DisaggThresholds, PrefillInputs, decide_prefill
from router.policies import PrefixAware
from router.routing import decide
from router.snapshot import Pending
from tests.unit.test_router_policies import query, snapshot, worker

T = DisaggThresholds(
    local_max_uncached_tokens=256,
    local_when_prefill_queue_tokens_over=4096,
    max_decode_running_for_local=32,
)


def inputs(
    tokens: int,
    *,
    prefill_cached: int = 0,
    decode_cached: int = 0,
    queue: int = 0,
    running: int = 0,
) -> PrefillInputs:
    return PrefillInputs(tokens, prefill_cached, decode_cached, queue, running)


# ---- the rule ---------------------------------------------------------------------------------


def test_short_prompts_prefill_locally_long_ones_remotely() -> None:
    assert decide_prefill(T, inputs(40)).mode == "local"
    assert decide_prefill(T, inputs(256)).reason == "short"
    long = decide_prefill(T, inputs(257))
    assert long.remote and long.reason == "long" and long.mode == "remote"


def test_the_decode_workers_prefix_hits_make_a_long_prompt_local() -> None:
    choice = decide_prefill(T, inputs(2000, decode_cached=1999))
    assert not choice.remote and choice.reason == "cached"
    assert decide_prefill(T, inputs(2000, decode_cached=1700)).remote  # 300 left: too many


def test_the_prefill_workers_hits_do_not_make_it_local() -> None:
    # Cached over there, not here: computing it here would cost the whole prompt.
    assert decide_prefill(T, inputs(2000, prefill_cached=1999)).remote


def test_a_backed_up_prefill_queue_sends_prompts_home() -> None:
    assert decide_prefill(T, inputs(1000, queue=4096)).remote  # at the threshold: remote
    choice = decide_prefill(T, inputs(1000, queue=5000))
    assert not choice.remote and choice.reason == "prefill_queue"
    # ... but not one longer than the queue it would skip.
    assert decide_prefill(T, inputs(6000, queue=5000)).reason == "long"


def test_a_busy_decode_worker_never_prefills() -> None:
    assert decide_prefill(T, inputs(10, running=31)).mode == "local"
    busy = decide_prefill(T, inputs(10, running=32))
    assert busy.remote and busy.reason == "decode_busy"
    assert decide_prefill(T, inputs(1000, queue=9999, running=40)).reason == "decode_busy"


def test_disabled_is_always_remote() -> None:
    off = DisaggThresholds(enabled=False)
    assert decide_prefill(off, inputs(1)).reason == "disabled"
    # local_max_uncached_tokens 0: even a fully cached prompt (1 token left) goes remote.
    never_short = DisaggThresholds(local_max_uncached_tokens=0)
    assert decide_prefill(never_short, inputs(10, decode_cached=9)).remote


# ---- YAML -------------------------------------------------------------------------------------


def test_yaml_section_per_pool() -> None:
    config = RouterConfig.from_mapping(
        {
            "pools": [
                {"name": "a", "conditional": {"local_max_uncached_tokens": 64}},
                {"name": "b"},
                {"name": "c", "conditional": {"enabled": False}},
                {"name": "d", "conditional": {}},
                {"name": "e", "conditional": None},
            ]
        }
    )
    a, b, c, d, e = config.pools
    assert a.conditional == DisaggThresholds(local_max_uncached_tokens=64)
    assert a.conditional.max_decode_running_for_local == 32
    assert b.conditional is None  # the default: always remote
    assert c.conditional is not None and not c.conditional.enabled
    assert d.conditional == DisaggThresholds() and e.conditional is None


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"local_max_uncached": 1}, "unknown keys"),
        ({"local_max_uncached_tokens": -1}, "local_max_uncached_tokens"),
        ({"max_decode_running_for_local": 1.5}, "max_decode_running_for_local"),
        ({"enabled": "yes"}, "enabled"),
        ("on", "mapping"),
    ],
)
def test_bad_sections_name_the_problem(section: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        RouterConfig.from_mapping({"pools": [{"name": "a", "conditional": section}]})


# ---- decide() ---------------------------------------------------------------------------------


def test_decide_without_thresholds_keeps_todays_behaviour() -> None:
    snap = snapshot(worker("p0"), worker("d0", WorkerRole.DECODE))
    decision = decide(snap, PrefixAware(), query(40), {})
    assert decision.prefill_worker_id == "p0" and decision.prefill_choice is None


def test_decide_prefills_short_prompts_on_the_decode_worker() -> None:
    snap = snapshot(worker("p0"), worker("d0", WorkerRole.DECODE))
    decision = decide(snap, PrefixAware(), query(40), {}, conditional=T)
    assert decision.prefill is None and decision.decode.worker_id == "d0"
    assert decision.prefill_choice is not None and decision.prefill_choice.reason == "short"
    assert dict(decision.prefill_scores) == {"p0": 40.0}  # what it was chosen over


def test_decide_reads_both_sides_of_the_index() -> None:
    snap = snapshot(worker("p0"), worker("d0", WorkerRole.DECODE))
    decision = decide(snap, PrefixAware(), query(640, {"p0": 40, "d0": 39}), {}, conditional=T)
    assert decision.prefill_inputs == inputs(640, prefill_cached=639, decode_cached=624)
    assert decision.prefill is None and decision.prefill_choice.reason == "cached"
    assert decision.predicted_cached_tokens == 624  # the decode worker's hits
    remote = decide(snap, PrefixAware(), query(640, {"p0": 40}), {}, conditional=T)
    assert remote.prefill_worker_id == "p0" and remote.predicted_cached_tokens == 639


def test_decide_reads_the_prefill_queue_and_the_decode_load() -> None:
    queued = snapshot(worker("p0", queued_tokens=9000), worker("d0", WorkerRole.DECODE))
    decision = decide(queued, PrefixAware(), query(1000), {}, conditional=T)
    assert decision.prefill is None and decision.prefill_choice.reason == "prefill_queue"
    # The router's own in-flight prompts count when the report lags.
    pending = {"p0": Pending(prefill_tokens=5000)}
    lagging = snapshot(worker("p0"), worker("d0", WorkerRole.DECODE))
    assert decide(lagging, PrefixAware(), query(1000), pending, conditional=T).prefill is None
    busy = snapshot(worker("p0"), worker("d0", WorkerRole.DECODE, running=30, queued=2))
    decision = decide(busy, PrefixAware(), query(40), {}, conditional=T)
    assert decision.prefill_worker_id == "p0" and decision.prefill_choice.reason == "decode_busy"
