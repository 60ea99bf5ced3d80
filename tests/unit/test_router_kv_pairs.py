"""The router's tie-break for (prefill, decode) pairs that already hold a KV pair group."""

from __future__ import annotations

from common.worker_info import BlockGeometry, WorkerInfo, WorkerLoad, WorkerRole
from router.policies import PrefixAware, RouteQuery, prefer_paired
from router.routing import decide
from router.snapshot import PoolSnapshot, WorkerView

GEOMETRY = BlockGeometry("m", "float32", 16, 30, 3, 64, 128)


def _decode(worker_id: str, running: int = 0) -> WorkerView:
    kv = f"127.0.0.1:{7000 + int(worker_id[1:])}"
    info = WorkerInfo(worker_id, WorkerRole.DECODE, "p", "m", "127.0.0.1:1", kv, GEOMETRY)
    return WorkerView(info, WorkerLoad(worker_id, 0, running, 100, 0, 0))


def _prefill(peers: tuple[str, ...]) -> WorkerView:
    info = WorkerInfo("p1", WorkerRole.PREFILL, "p", "m", "127.0.0.1:2", None, GEOMETRY)
    return WorkerView(info, WorkerLoad("p1", 0, 0, 100, 0, 0, kv_peers=peers))


def _query() -> RouteQuery:
    return RouteQuery(64, 16, 16, {})


def test_a_tie_goes_to_the_decode_worker_with_a_group() -> None:
    d1, d2 = _decode("d1"), _decode("d2")
    prefill = _prefill((d2.info.kv_address,))  # type: ignore[arg-type]
    pick = PrefixAware().pick_decode([d1, d2], _query(), {})
    assert pick.worker.worker_id == "d1"  # equal costs: the id breaks the tie
    paired = prefer_paired(pick, [d1, d2], prefill, _query())
    assert paired.worker.worker_id == "d2" and paired.scores == pick.scores


def test_a_clearly_better_decode_worker_wins_over_the_group() -> None:
    d1, d2 = _decode("d1"), _decode("d2", running=3)
    prefill = _prefill((d2.info.kv_address,))  # type: ignore[arg-type]
    pick = PrefixAware().pick_decode([d1, d2], _query(), {})
    assert prefer_paired(pick, [d1, d2], prefill, _query()).worker.worker_id == "d1"


def test_no_report_no_change() -> None:
    d1, d2 = _decode("d1"), _decode("d2")
    pick = PrefixAware().pick_decode([d1, d2], _query(), {})
    assert prefer_paired(pick, [d1, d2], _prefill(()), _query()) is pick


def test_decide_applies_the_tie_break() -> None:
    d1, d2 = _decode("d1"), _decode("d2")
    snap = PoolSnapshot("p", prefill=(_prefill((d2.info.kv_address,)),), decode=(d1, d2))  # type: ignore[arg-type]
    assert decide(snap, PrefixAware(), _query(), {}).decode.worker_id == "d2"
    plain = PoolSnapshot("p", prefill=(_prefill(()),), decode=(d1, d2))
    assert decide(plain, PrefixAware(), _query(), {}).decode.worker_id == "d1"


def test_kv_peers_round_trip_and_default() -> None:
    load = WorkerLoad("w", 0, 0, 1, 0, 0, kv_peers=("127.0.0.1:9",))
    assert WorkerLoad.from_json(load.to_json()).kv_peers == ("127.0.0.1:9",)
    old = load.to_json().replace(',"kv_peers":["127.0.0.1:9"]', "")
    assert "kv_peers" not in old and WorkerLoad.from_json(old).kv_peers == ()
