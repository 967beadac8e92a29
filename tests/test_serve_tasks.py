"""Question answering and image classification through real Ray Serve on 127.0.0.1 and real
HTTP: `capaserve serve`'s app on the embedded MiniLM with QA adapters, then on a tiny ViT
folder (`--model ./vit-folder`) with image classifiers. Answers are compared with the
independent references (tests/qa_reference.py, tests/image_reference.py). Each class runs
its own app, so only one Ray cluster is up at a time."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer

from adapters.bundle import Task, save_bundle
from adapters.synthetic import random_bundle
from adapters.tasks.model_loader import meta_spec
from tests.conftest import MINILM_ID
from tests.image_reference import IMAGES, reference_probs, vit_classifier
from tests.qa_reference import qa_model, reference_answer
from tests.serve_helpers import error_of, running_app

pytestmark = pytest.mark.ray

CONTEXT = "\n".join(
    f"Parcel {i} was sent from {city} to {dest} on day {i * 3} by {who}."
    for i, (city, dest, who) in enumerate(
        [("Zürich", "Lyon", "Aïcha"), ("Oslo", "Porto", "Bruno"), ("Kyoto", "Lima", "Chen")] * 14
    )
)
QUESTIONS = ["Who sent parcel 20?", "Where did parcel 7 go?", "On which day was parcel 31 sent?"]


def _app_args(tmp_path_factory: pytest.TempPathFactory, **kw: object) -> dict:
    return {"registry": str(tmp_path_factory.mktemp("registry")), "replicas": 1, "num_cpus": 1, **kw}


def _upload(base: str, name: str, path: Path) -> None:
    r = httpx.put(f"{base}/v1/adapters/{name}", content=path.read_bytes(), timeout=60)
    assert r.status_code == 201, r.text


class TestQuestionAnswering:
    @pytest.fixture(scope="class")
    @classmethod
    def setup(cls, tmp_path_factory, minilm_dir: Path):
        spec = meta_spec(str(minilm_dir), MINILM_ID)
        targets = [n for n in spec.linear_shapes if n.endswith(("attention.self.query", "attention.self.value"))]
        bundles = {
            name: random_bundle(spec, targets, seed=seed, std=0.2, task=Task.QUESTION_ANSWERING)
            for name, seed in (("qa-x", 41), ("qa-y", 42))
        }
        folder = tmp_path_factory.mktemp("qa-bundles")
        with running_app(_app_args(tmp_path_factory), num_cpus=2) as base:
            for name, bundle in bundles.items():
                _upload(base, name, save_bundle(bundle, folder / f"{name}.safetensors"))
            yield base, {name: qa_model(minilm_dir, b) for name, b in bundles.items()}

    def test_answers_equal_the_reference_under_concurrency(self, setup, minilm_dir: Path) -> None:
        base, oracles = setup
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
        asks = [(name, q) for q in QUESTIONS for name in ("qa-x", "qa-y")]

        def ask(pair: tuple[str, str]) -> httpx.Response:
            body = {"model": pair[0], "input": [{"question": pair[1], "context": CONTEXT}]}
            return httpx.post(f"{base}/v1/question-answering", json=body, timeout=120)

        with ThreadPoolExecutor(len(asks)) as pool:
            answers = list(pool.map(ask, asks))
        for r, (name, q) in zip(answers, asks):
            assert r.status_code == 200, r.text
            (d,) = r.json()["data"]
            want = reference_answer(oracles[name], tokenizer, q, CONTEXT)
            assert (d["answer"], d["start"], d["end"]) == (want.answer, want.start, want.end)
            assert abs(d["score"] - want.score) <= 1e-4 and d["answer"] == CONTEXT[d["start"]:d["end"]]
        assert len(want.windows) >= 2  # the context takes more than one window

        wrong = httpx.post(f"{base}/v1/classify", json={"model": "qa-x", "input": "text"}, timeout=60)
        assert wrong.status_code == 400 and "question-answering" in error_of(wrong)["message"]
        cards = {m["id"]: m["task"] for m in httpx.get(f"{base}/v1/models", timeout=60).json()["data"]}
        assert cards == {MINILM_ID: "feature-extraction", "qa-x": "question-answering", "qa-y": "question-answering"}


class TestImageClassification:
    VIT = "tiny/vit"

    @pytest.fixture(scope="class")
    @classmethod
    def setup(cls, tmp_path_factory, tiny_vit_dir: Path):
        spec = meta_spec(str(tiny_vit_dir), cls.VIT)
        targets = [n for n in spec.linear_shapes if n.endswith(("attention.q_proj", "attention.v_proj"))]
        bundle = random_bundle(spec, targets, seed=51, std=0.2, task=Task.IMAGE_CLASSIFICATION, labels=["a", "b", "c"])
        path = save_bundle(bundle, tmp_path_factory.mktemp("img-bundles") / "shapes.safetensors")
        args = _app_args(tmp_path_factory, model=str(tiny_vit_dir), served_model_name=cls.VIT)
        with running_app(args, num_cpus=2) as base:
            _upload(base, "shapes", path)
            yield base, vit_classifier(tiny_vit_dir, bundle)

    def test_png_and_jpeg_equal_the_reference_and_bad_images_are_refused(self, setup, tiny_vit_dir: Path) -> None:
        base, model = setup
        r = httpx.post(f"{base}/v1/classify", json={"model": "shapes", "input": IMAGES}, timeout=120)
        assert r.status_code == 200, r.text
        want = reference_probs(model, AutoImageProcessor.from_pretrained(str(tiny_vit_dir)), IMAGES)
        torch.testing.assert_close(torch.tensor([d["probs"] for d in r.json()["data"]]), want, atol=1e-4, rtol=0)
        assert [d["label"] for d in r.json()["data"]] == [["a", "b", "c"][i] for i in want.argmax(-1).tolist()]

        png = base64.b64decode(IMAGES[0].split(",", 1)[1])
        truncated = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()  # half a PNG
        for bad, fragment in [
            (truncated, "truncated or corrupt"),
            ("https://example.com/cat.png", "remote image URLs are not fetched"),
            ("data:image/png;base64,aGVsbG8=", "not a PNG or JPEG image"),
        ]:
            r = httpx.post(f"{base}/v1/classify", json={"model": "shapes", "input": [IMAGES[1], bad]}, timeout=60)
            assert r.status_code == 400 and fragment in error_of(r)["message"], r.text
        r = httpx.post(f"{base}/v1/question-answering", json={"model": "shapes", "input": {"question": "q", "context": "c"}}, timeout=60)
        assert r.status_code == 400
        r = httpx.post(f"{base}/v1/embeddings", json={"model": self.VIT, "input": IMAGES[:1]}, timeout=60)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 32
        card = httpx.get(f"{base}/v1/models", timeout=60).json()["data"][0]
        assert (card["id"], card["modality"]) == (self.VIT, "image")
        assert httpx.get(f"{base}/readyz", timeout=60).status_code == 200
