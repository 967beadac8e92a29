"""The load test keeps working: Locust for a few seconds, 2 users, 3 adapters, a real app on 127.0.0.1.

Also the pure parts: Zipf weights, the mix, the plan's order, and that the answer checks
tell a malformed answer (failure) from a wrong one (contamination).
"""

from __future__ import annotations

import json

import pytest

from loadtest.run import Case, LoadTestConfig, plan, schedule
from loadtest.scenario import (
    ATOL_BY_DTYPE,
    CheckError,
    Contaminated,
    Reference,
    check_answer,
    parse_mix,
    zipf_weights,
)


def test_zipf_weights_are_normalised_and_skewed():
    w = zipf_weights(50, 1.0)
    assert abs(sum(w) - 1) < 1e-12 and w == sorted(w, reverse=True)
    assert w[0] / w[1] == pytest.approx(2.0)
    assert zipf_weights(4, 0.0) == [0.25] * 4


@pytest.mark.parametrize(
    ("mix", "expected"),
    [("auto", {}), ("embeddings=2,classify=1", {"embeddings": 2.0, "classify": 1.0}), ("completions", {"completions": 1.0})],
)
def test_parse_mix(mix, expected):
    assert parse_mix(mix) == expected


@pytest.mark.parametrize("mix", ["rerank=1", "embeddings=-1", "embeddings=nan"])
def test_parse_mix_rejects(mix):
    with pytest.raises(ValueError, match="mix"):
        parse_mix(mix)


def test_plan_puts_the_goal_trio_first_and_alternates_rounds():
    cfg = LoadTestConfig(adapters=[1, 10, 50], zipf=[0.5, 1.0], progress=False)
    cases = plan(cfg)
    assert cases[:3] == [Case(app="grouped", adapters=1, zipf=1.0), Case(app="grouped", adapters=50, zipf=1.0),
                         Case(app="baseline", adapters=50, zipf=1.0)]
    assert len(cases) == len(set(cases)) == 1 + 2 * 2 + 3
    steps = schedule(cases, 2)
    assert [c for _, c in steps[len(cases):]] == cases[::-1]


def test_url_must_be_loopback():
    with pytest.raises(ValueError, match="loopback"):
        LoadTestConfig(url="http://example.com:8000")
    assert LoadTestConfig(url="http://127.0.0.1:8000/").baseline is False


REF = Reference(adapter="a", task="sequence-classification", embeddings=[[1.0, 0.0], [0.0, 1.0]],
                labels=["x", "y"], probs=[[0.9, 0.1], [0.2, 0.8]])


@pytest.mark.parametrize(
    ("kind", "body", "idx", "error"),
    [
        ("embeddings", {"data": [{"index": 0, "embedding": [0.0, 1.0]}]}, [1], None),
        ("embeddings", {"data": [{"index": 0, "embedding": [0.0, 1.00005]}]}, [1], None),
        ("embeddings", {"data": [{"index": 0, "embedding": [0.0, 1.0, 0.0]}]}, [1], CheckError),
        ("embeddings", {"data": []}, [1], CheckError),
        ("embeddings", {"data": [{"index": 0, "embedding": [1.0, 0.0]}]}, [1], Contaminated),
        ("classify", {"data": [{"index": 0, "label": "x", "probs": [0.9, 0.1]}]}, [0], None),
        ("classify", {"data": [{"index": 0, "label": "y", "probs": [0.2, 0.8]}]}, [0], Contaminated),
        ("classify", {"data": [{"index": 0, "label": "x", "probs": [0.9]}]}, [0], CheckError),
        ("completions", {"choices": []}, [0], CheckError),
    ],
)
def test_check_answer(kind, body, idx, error):
    if error is None:
        check_answer(kind, body, REF, idx, compare=True)
    else:
        with pytest.raises(error):
            check_answer(kind, body, REF, idx, compare=True)
    if error is not CheckError:  # well-formed: passes when not compared
        check_answer(kind, body, REF, idx, compare=False)


def test_check_tolerance_follows_the_dtype():
    """bfloat16 batch noise (~2.5e-3) passes at its tolerance but not at float32's; another
    adapter's answer (differences >= 0.12 in the load test) fails at both."""
    noisy = {"data": [{"index": 0, "embedding": [0.003, 0.997]}]}
    with pytest.raises(Contaminated):
        check_answer("embeddings", noisy, REF, [1], compare=True, atol=ATOL_BY_DTYPE["float32"])
    check_answer("embeddings", noisy, REF, [1], compare=True, atol=ATOL_BY_DTYPE["bfloat16"])
    tied = Reference(adapter="a", task="sequence-classification", embeddings=[[1.0, 0.0]], labels=["y"],
                     probs=[[0.498, 0.502]])
    flipped = {"data": [{"index": 0, "label": "x", "probs": [0.5005, 0.4995]}]}
    check_answer("classify", flipped, tied, [0], compare=True, atol=ATOL_BY_DTYPE["bfloat16"])  # a near-tie
    with pytest.raises(Contaminated):
        check_answer("classify", flipped, tied, [0], compare=True, atol=ATOL_BY_DTYPE["float32"])
    with pytest.raises(Contaminated):  # a clear winner must keep its label
        check_answer("classify", {"data": [{"index": 0, "label": "y", "probs": [0.9, 0.1]}]}, REF, [0],
                     compare=True, atol=ATOL_BY_DTYPE["bfloat16"])
    wrong = {"data": [{"index": 0, "embedding": [0.12, 0.88]}]}
    with pytest.raises(Contaminated):
        check_answer("embeddings", wrong, REF, [1], compare=True, atol=ATOL_BY_DTYPE["bfloat16"])


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_locust_scenario_against_a_real_server(tmp_path):
    from loadtest.run import run

    cfg = LoadTestConfig(adapters=[3], zipf=[1.0], goal_adapters=3, users=2, duration_s=4, baseline=False,
                         single=False, check_fraction=0.5, out=tmp_path, progress=False)
    summary = run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = results["rows"]
    assert row["label"] == "grouped N=3 s=1"
    assert row["requests"] > 0 and row["checked"] > 0
    assert row["failures"] == 0 and row["contaminated"] == 0, row["samples"]
    assert summary.exists() and "contaminated: **0**" in summary.read_text()
    for name in ("throughput.png", "latency.png", "swaps.png", "csv/references.json",
                 "csv/grouped-n3-s1-r0_stats.csv", "csv/grouped-n3-s1-r0_summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
