"""capacity/search.py and capacity/serve_yaml.py on plain functions and the shipped YAML."""

from __future__ import annotations

from capacity.plan_types import COLOCATED, DISAGG, Autoscale, Candidate
from capacity.search import min_true, minimize
from capacity.serve_yaml import candidate_config
from deploy.serve_config import DEFAULT_CONFIG


def test_min_true_finds_the_threshold_in_few_calls() -> None:
    calls: list[int] = []

    def pred(n: int) -> bool:
        calls.append(n)
        return n >= 37

    assert min_true(pred, 1, 1000) == 37
    assert len(calls) < 20
    assert min_true(lambda n: False, 1, 10) is None


def test_minimize_finds_the_best_split() -> None:
    # prefill p needs decode d(p) = ceil(400 / p): p + d(p) is smallest at p = 20.
    def batch(ps):
        return [p + -(-400 // p) if p >= 5 else None for p in ps]

    best, value = minimize(batch, 1, 200)
    assert value == 40 and best + -(-400 // best) == 40


def test_candidate_yaml_validates() -> None:
    config = candidate_config(Candidate(DISAGG, 3, 5), DEFAULT_CONFIG)
    assert config.deployment("PrefillWorker")["num_replicas"] == 3
    scaled = Candidate(COLOCATED, 4, prefill_scaling=Autoscale(1, 4, (("itl_p90_ms", 40.0),)))
    config = candidate_config(scaled, DEFAULT_CONFIG)
    worker = config.deployment("Worker")["autoscaling_config"]
    assert worker["max_replicas"] == 4 and worker["policy"]["policy_kwargs"]["itl_p90_ms"] == 40


def test_written_yaml_passes_pdserve_check(tmp_path) -> None:
    from capacity.serve_yaml import GPU_CONFIG, write_config
    from deploy.cli import main

    config = candidate_config(Candidate(DISAGG, 500, 500), GPU_CONFIG)
    path = write_config(config, tmp_path / "serve.yaml", header="planned: 500P+500D")
    assert main(["check", "--config", str(path)]) == 0


def test_min_true_near_brackets_from_the_guess() -> None:
    from capacity.search import min_true_near

    for guess in (1, 30, 37, 38, 60, 5000):
        for grow in (1, 2):
            calls: list[int] = []

            def pred(n: int, calls: list[int] = calls) -> bool:
                calls.append(n)
                return n >= 37

            assert min_true_near(pred, guess, 1, 1000, grow) == 37
            assert all(1 <= n <= 1000 for n in calls)
    near: list[int] = []
    assert min_true_near(lambda n: near.append(n) or n >= 37, 36, 1, 1000) == 37
    assert len(near) <= 2  # a guess one below costs two probes
    assert min_true_near(lambda n: False, 5, 1, 10) is None
