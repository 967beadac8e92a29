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


QA_REF = Reference(adapter="q", task="question-answering", embeddings=[[1.0, 0.0]],
                   answers=[{"answer": "the dog", "score": 0.5, "start": 4, "end": 11}])


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"data": [{"index": 0, "answer": "the dog", "score": 0.50004, "start": 4, "end": 11}]}, None),
        ({"data": [{"index": 0, "answer": "dog", "score": 0.5, "start": 8, "end": 11}]}, Contaminated),
        ({"data": [{"index": 0, "answer": "the dog", "score": 0.6, "start": 4, "end": 11}]}, Contaminated),
        ({"data": [{"index": 0, "answer": "the dog", "start": 4, "end": 11}]}, CheckError),
        ({"data": [{"index": 0, "answer": "x", "score": 2.0, "start": 4, "end": 11}]}, CheckError),
        ({"data": [{"index": 0, "answer": "x", "score": 0.5, "start": 9, "end": 4}]}, CheckError),
    ],
)
def test_check_question_answering(body, error):
    assert parse_mix("question-answering=2,embeddings=1") == {"question-answering": 2.0, "embeddings": 1.0}
    if error is None:
        check_answer("question-answering", body, QA_REF, [0], compare=True)
    else:
        with pytest.raises(error):
            check_answer("question-answering", body, QA_REF, [0], compare=True)


def test_picker_draws_questions_and_images_are_valid():
    from adapters.tasks.images import ImageLimits, image_bytes
    from loadtest.scenario import Picker, ReferenceSet, images

    refs = ReferenceSet(texts=list(images()), adapters={"q": QA_REF})
    picker = Picker(refs, ["q"], 1.0, {}, texts_per_request=3, seed=1)
    assert set(picker.mix) == {"embeddings", "question-answering"}
    kinds = {picker.draw()[0] for _ in range(40)}
    assert kinds == {"embeddings", "question-answering"}
    body = refs.inputs("question-answering", [0, 5])
    assert body[0]["question"] and len(body[1]["context"]) > len(body[0]["context"])
    for i, url in enumerate(images()):  # every load-test image passes the server's checks
        image_bytes(url, i, ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20))


@pytest.mark.ray
@pytest.mark.timeout(240)
@pytest.mark.parametrize("base", ["minilm-qa", "tiny-vit"])
def test_locust_mix_of_new_tasks(base, tmp_path, tiny_vit_dir):
    """QA adapters on MiniLM (question answering and embeddings) and image classifiers on a
    tiny ViT (classify and embeddings of images): no failure, no contamination."""
    from loadtest.run import run

    extra = {"adapter_task": "question-answering"} if base == "minilm-qa" else {"model": str(tiny_vit_dir)}
    cfg = LoadTestConfig(adapters=[2], zipf=[1.0], goal_adapters=2, users=2, duration_s=3, baseline=False,
                         single=False, check_fraction=0.5, out=tmp_path, progress=False, **extra)
    run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = results["rows"]
    assert row["requests"] > 0 and row["checked"] > 0
    assert row["failures"] == 0 and row["contaminated"] == 0, row["samples"]
    kinds = {"question-answering", "embeddings"} if base == "minilm-qa" else {"classify", "embeddings"}
    (one,) = results["runs"]
    assert set(one["by_endpoint"]) == {f"/v1/{k}" for k in kinds}  # both endpoints were driven
    ref = json.loads((tmp_path / "csv" / "references.json").read_text())["adapters"]["lt-000"]
    assert (ref["answers"] is not None) == (base == "minilm-qa") and (ref["probs"] is not None) == (base == "tiny-vit")


def test_help_lists_flags_without_the_extra_and_a_run_says_what_to_install(tmp_path):
    """The extra's modules shadowed by ones that fail to import, as when it is not installed."""
    import os
    import subprocess

    from tests.serve_helpers import CAPASERVE

    for name in ("httpx", "locust", "matplotlib"):
        (tmp_path / f"{name}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    shown = subprocess.run([CAPASERVE, "loadtest", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0 and "--adapters" in shown.stdout and "--zipf" in shown.stdout, shown.stderr
    ran = subprocess.run([CAPASERVE, "loadtest", "--adapters", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert ran.returncode == 1
    assert "needs the loadtest extra (httpx is missing): pip install 'capaserve[loadtest]'" in ran.stderr
