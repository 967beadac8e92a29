"""`capaserve train`: it learns, and the bundle it writes reproduces the trained model.

The classification run (module fixture, ~40 steps on the embedded MiniLM) is a word-order
task on held-out (animal, thing, verb) combinations: "the cat sees the car" is
animal-first, "the car sees the cat" thing-first, so both classes hold the same bag of
words. It is compared with a head-only baseline (same head, steps, lr and batches on the
frozen base) and then served three ways that must agree with the live training model:
merged into a plain transformers model by hand, through `capaserve inspect`, and over
HTTP from a real Ray Serve app.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapters.bundle import Task
from adapters.validation import load_bundle
from adapters.merge import delta_weight, rank_of
from adapters.training.config import DEFAULT_MODEL_ID, TrainConfig
from adapters.training.data import TrainingDataError, label_ids, label_names, read_jsonl
from adapters.training.model import ClassificationHead, match_targets
from tests.serve_helpers import CAPASERVE
from tests.train_helpers import head_only_accuracy as train_head_only
from tests.train_helpers import one_thread, write_jsonl  # noqa: F401 - one_thread is an autouse fixture

ANIMALS = ["cat", "dog", "horse", "lion", "tiger", "mouse", "bird", "fox", "wolf", "bear", "goat", "sheep"]
THINGS = ["car", "table", "rock", "chair", "lamp", "box", "cup", "door", "phone", "book", "shoe", "pen"]
VERBS = ["sees", "follows", "finds", "pushes"]
STEPS, LR, BATCH = 40, 3e-3, 16
#: One CPU thread: the box is shared, and oversubscribed threads make each step 5x slower.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def word_order_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """256 training and 128 eval sentences; no (animal, thing, verb) triple is in both."""
    r = random.Random(seed)
    combos = [(a, t, v) for a in ANIMALS for t in THINGS for v in VERBS]
    r.shuffle(combos)
    half = len(combos) // 2

    def rows(pool: list[tuple[str, str, str]], n: int) -> list[dict]:
        out = []
        for a, t, v in r.sample(pool, n):
            if r.random() < 0.5:
                out.append({"text": f"the {a} {v} the {t}", "label": "animal-first"})
            else:
                out.append({"text": f"the {t} {v} the {a}", "label": "thing-first"})
        return out

    return rows(combos[:half], 256), rows(combos[half:], 128)


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cls-data")
    train_rows, eval_rows = word_order_rows()
    return write_jsonl(folder / "train.jsonl", train_rows), write_jsonl(folder / "eval.jsonl", eval_rows)


@pytest.fixture(scope="module")
def trained_cls(cls_data, tmp_path_factory):
    from adapters.training.trainer import train

    train_path, eval_path = cls_data
    cfg = TrainConfig(
        task=Task.SEQUENCE_CLASSIFICATION, data=train_path, eval_data=eval_path,
        output=tmp_path_factory.mktemp("cls-out") / "order.safetensors",
        rank=8, num_copies=2, density=0.5, alpha=16, targets=["query", "value"],
        steps=STEPS, lr=LR, batch_size=BATCH, max_length=16, seed=0, mask_seed=0, progress=False,
    )
    return train(cfg, log=lambda s: None)


def served_probs(model_dir: Path, bundle_path: Path, texts: list[str]) -> torch.Tensor:
    """What the server must answer, computed independently of the training code: a plain
    AutoModel with W + delta_W written into each target, mean-pooled, then the docs/bundle-format.md head."""
    from transformers import AutoModel, AutoTokenizer

    bundle = load_bundle(bundle_path)
    meta = bundle.metadata
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, f in bundle.targets.items():
            w = model.get_submodule(name).weight
            w.copy_(w.float() + delta_weight(f, meta.scaling))
        enc = tok(texts, padding=True, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1) if meta.pooling == "mean" else h[:, 0]
        hd = bundle.head
        x = torch.tanh(pooled @ hd["head.dense.weight"].t() + hd["head.dense.bias"])
        return torch.softmax(x @ hd["head.out.weight"].t() + hd["head.out.bias"], dim=-1)


def training_probs(result, texts: list[str]) -> torch.Tensor:
    result.model.eval()
    enc = result.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(result.model(enc["input_ids"], enc["attention_mask"]), dim=-1)


PROBE_TEXTS = [
    "the wolf pushes the lamp",
    "the shoe finds the tiger",
    "a much longer sentence, so that padding and the attention mask matter for the mean pooling",
    "cat",
]

# --------------------------------------------------------------------------- learning


def head_only_accuracy(minilm_dir: Path, train_path: Path, eval_path: Path) -> float:
    """The same head, steps, lr and batch size on the frozen base (features cached)."""
    from transformers import AutoModel, AutoTokenizer

    tr, ev = read_jsonl(train_path, Task.SEQUENCE_CLASSIFICATION), read_jsonl(eval_path, Task.SEQUENCE_CLASSIFICATION)
    names = label_names(tr)
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    base = AutoModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()

    def feats(ds):
        enc = tok([e.text for e in ds.examples], padding=True, return_tensors="pt")
        with torch.no_grad():
            h = base(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1), torch.tensor(label_ids(ds, names))

    train, evaluation = feats(tr), feats(ev)
    torch.manual_seed(0)
    head = ClassificationHead(train[0].shape[1], len(names))
    return train_head_only(head, train, evaluation, steps=STEPS, lr=LR, batch=BATCH)


def test_classification_learns_word_order_beyond_head_only(trained_cls, cls_data, minilm_dir):
    first, last = trained_cls.initial_eval, trained_cls.history[-1]
    baseline = head_only_accuracy(minilm_dir, *cls_data)
    print(f"\naccuracy: before {first.eval_accuracy:.3f}, head-only {baseline:.3f}, adapter {last.eval_accuracy:.3f}; "
          f"eval loss {first.eval_loss:.3f} -> {last.eval_loss:.3f}")
    assert first.eval_accuracy < 0.65  # chance before training
    assert last.eval_accuracy >= 0.9
    assert last.eval_loss < 0.5 * first.eval_loss
    assert last.eval_accuracy >= baseline + 0.1
    assert last.step == STEPS and [r.epoch for r in trained_cls.history] == list(range(1, len(trained_cls.history) + 1))


def test_bundle_metadata_records_the_run(trained_cls):
    meta = load_bundle(trained_cls.path).metadata
    assert meta.base_model == DEFAULT_MODEL_ID and meta.task is Task.SEQUENCE_CLASSIFICATION
    assert (meta.rank, meta.num_copies, meta.alpha, meta.density) == (8, 2, 16.0, 0.5)
    assert meta.labels == ["animal-first", "thing-first"] and meta.pooling == "mean"
    assert meta.targets == [f"encoder.layer.{i}.attention.self.{p}" for i in range(6) for p in ("query", "value")]
    assert "eval on eval.jsonl" in meta.description and "accuracy" in meta.description
    # stored as a seed bundle: the masks are the format's generator's, no mask bytes in the file
    assert meta.encoding == "seed" and meta.mask_seed == 0 and "mask_seed 0" in meta.description
    with safe_open(str(trained_cls.path), "pt") as f:
        assert not [k for k in f.keys() if ".mask_" in k]


# --------------------------------------------------------------------------- the bundle reproduces the model


def test_bundle_reproduces_training_model(trained_cls, minilm_dir):
    want = training_probs(trained_cls, PROBE_TEXTS)
    got = served_probs(minilm_dir, trained_cls.path, PROBE_TEXTS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert want.max(-1).values.min() > 0.6  # confident answers, not a flat 0.5 that matches trivially


def test_exported_factors_are_the_trained_modules(trained_cls):
    bundle = load_bundle(trained_cls.path)
    for name, layer in trained_cls.model.layers().items():
        f = bundle.targets[name]
        assert torch.equal(f.mask_A, layer.mask_A) and torch.equal(f.mask_B, layer.mask_B)
        assert torch.equal(f.lora_A, layer.lora_A.detach()) and torch.equal(f.lora_B, layer.lora_B.detach())
        assert float(f.lora_B.abs().max()) > 0  # trained, not the zero init


def test_delta_rank_exceeds_r_and_inspect_reports_it(trained_cls):
    bundle = load_bundle(trained_cls.path)
    r = bundle.metadata.rank
    ranks = {n: rank_of(f, bundle.metadata.scaling) for n, f in bundle.targets.items()}
    print(f"\nrank(delta_W) per target (r={r}): {sorted(ranks.values())}")
    assert max(ranks.values()) > r and all(v <= 2 * r for v in ranks.values())

    proc = subprocess.run([CAPASERVE, "inspect", "--json", str(trained_cls.path)],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert {t["name"]: t["delta_rank"] for t in info["targets"]} == ranks


@pytest.mark.ray
def test_http_classify_matches_training_model(trained_cls, tmp_path):
    import httpx

    pytest.importorskip("ray")
    from tests.serve_helpers import running_app

    want = training_probs(trained_cls, PROBE_TEXTS)
    args = {"registry": str(tmp_path / "registry"), "replicas": 1, "num_cpus": 1}
    with running_app(args, num_cpus=2) as base:
        r = httpx.put(f"{base}/v1/adapters/order", content=trained_cls.path.read_bytes(), timeout=60)
        assert r.status_code == 201, r.text
        r = httpx.post(f"{base}/v1/classify", json={"model": "order", "input": PROBE_TEXTS}, timeout=60)
        assert r.status_code == 200, r.text
    data = r.json()["data"]
    got = torch.tensor([d["probs"] for d in data])
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=0)
    assert [d["label"] for d in data] == [trained_cls.labels[i] for i in want.argmax(-1).tolist()]


# --------------------------------------------------------------------------- other tasks


def test_causal_lm_on_tiny_llama(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from adapters.training.trainer import train
    from adapters.validation import BaseModelSpec, check_servable, load_bundle

    texts = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny language model"]
    data = write_jsonl(tmp_path / "lm.jsonl", [{"text": t} for t in texts * 8])
    cfg = TrainConfig(model=str(tiny_llama_dir), base_model_id="tiny-llama", task=Task.CAUSAL_LM, data=data,
                      output=tmp_path / "lm.safetensors", targets=["q_proj", "v_proj"], steps=32,
                      lr=1e-2, batch_size=8, max_length=32, progress=False, mask_seed=0)
    res = train(cfg, log=lambda s: None)
    assert res.history[-1].eval_loss < res.initial_eval.eval_loss - 0.5
    bundle = load_bundle(res.path)
    assert bundle.metadata.base_model == "tiny-llama" and bundle.metadata.targets == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    check_servable(bundle, BaseModelSpec.from_model("tiny-llama", Task.CAUSAL_LM, plain, plain.config.hidden_size))
    with torch.no_grad():
        for name, f in bundle.targets.items():
            w = plain.get_submodule(name).weight
            w.copy_(w + delta_weight(f, bundle.metadata.scaling))
        ids = res.tokenizer(texts[0], return_tensors="pt")["input_ids"]
        torch.testing.assert_close(plain(ids).logits, res.model(ids, torch.ones_like(ids)).logits, atol=1e-4, rtol=0)


def test_feature_extraction_embeddings_reproduced(minilm_dir, tmp_path):
    from transformers import AutoModel

    from adapters.training.trainer import train

    pairs = [{"anchor": f"the {a} sleeps", "positive": f"a {a} is sleeping"} for a in ANIMALS[:8]]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = TrainConfig(task=Task.FEATURE_EXTRACTION, data=data, output=tmp_path / "fe.safetensors",
                      steps=3, lr=1e-3, batch_size=8, max_length=16, progress=False)
    res = train(cfg, log=lambda s: None)
    bundle = load_bundle(res.path)
    assert bundle.metadata.task is Task.FEATURE_EXTRACTION and not bundle.head
    plain = AutoModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()
    enc = res.tokenizer(["the dog sleeps", "a much longer sentence about a sleeping dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        for name, f in bundle.targets.items():
            w = plain.get_submodule(name).weight
            w.copy_(w + delta_weight(f, bundle.metadata.scaling))
        h = plain(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        res.model.eval()
        torch.testing.assert_close(res.model(enc["input_ids"], enc["attention_mask"]), want, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- bad input

CLS = Task.SEQUENCE_CLASSIFICATION
DATA_ERROR_CASES = [
    # (name, task, file content, expected message)
    ("not json", CLS, '{"text": "a", "label": 1}\n{"text": "b", label: 2}\n', "data.jsonl:2: not valid JSON"),
    ("not an object", CLS, '["a", 1]\n', "data.jsonl:1: expected a JSON object, got list"),
    ("missing label", CLS, '{"text": "a"}\n', "data.jsonl:1: missing key 'label' for task sequence-classification"),
    ("label is a float", CLS, '{"text": "a", "label": 1.5}\n', "data.jsonl:1: 'label' must be a string or an integer, got float"),
    ("label is a bool", CLS, '{"text": "a", "label": true}\n', "'label' must be a string or an integer, got bool"),
    ("text not a string", CLS, '{"text": 3, "label": "x"}\n', "data.jsonl:1: 'text' must be a string, got int"),
    ("empty text", CLS, '{"text": "  ", "label": "x"}\n', "data.jsonl:1: 'text' must not be empty"),
    ("mixed label kinds", CLS, '{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n',
     "labels mix strings and integers (int on line 1, str on line 2)"),
    ("empty file", CLS, "", "data.jsonl: no examples (the file is empty or only blank lines)"),
    ("only blank lines", CLS, "\n  \n", "no examples"),
    ("bad utf-8", CLS, b'{"text": "\xff", "label": 1}\n', "data.jsonl:1: not valid UTF-8"),
    ("lm missing text", Task.CAUSAL_LM, '{"prompt": "a"}\n', "data.jsonl:1: missing key 'text' for task causal-lm"),
    ("pairs missing positive", Task.FEATURE_EXTRACTION, '{"anchor": "a"}\n',
     "data.jsonl:1: missing key 'positive' for task feature-extraction"),
]


@pytest.mark.parametrize("name,task,content,expected", DATA_ERROR_CASES, ids=[c[0] for c in DATA_ERROR_CASES])
def test_malformed_data_is_reported(tmp_path, name, task, content, expected):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TrainingDataError) as exc:
        read_jsonl(path, task)
    assert expected in str(exc.value)
    assert str(path) in str(exc.value)


def test_every_bad_line_is_reported_at_once(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok", "label": 0}, {"text": 1, "label": 0}, {"label": 0}])
    with pytest.raises(TrainingDataError) as exc:
        read_jsonl(path, CLS)
    assert [p.split(": ", 1)[0] for p in exc.value.problems] == [f"{path}:2", f"{path}:3"]


def test_label_checks(tmp_path):
    one = read_jsonl(write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}] * 3), CLS)
    with pytest.raises(TrainingDataError, match="at least 2 labels"):
        label_names(one)
    train_ds = read_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 10}, {"text": "b", "label": 2}]), CLS)
    assert label_names(train_ds) == ["2", "10"]  # integers sort numerically
    eval_ds = read_jsonl(write_jsonl(tmp_path / "e.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": 7}]), CLS)
    with pytest.raises(TrainingDataError, match=r"e.jsonl:2: label 7 is not among the training labels"):
        label_ids(eval_ds, label_names(train_ds))


def test_config_and_target_errors(tiny_llama_dir, tmp_path):
    from pydantic import ValidationError
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValidationError, match="either epochs or steps"):
        TrainConfig(task=CLS, data=tmp_path / "d", output=tmp_path / "o", epochs=1, steps=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert match_targets(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match=r"targets \['query'\] match no Linear/Conv1D layer.*'q_proj'"):
        match_targets(model, ["q_proj", "query"])


# --------------------------------------------------------------------------- the console script


def test_cli_trains_a_bundle(tmp_path):
    data = write_jsonl(tmp_path / "tiny.jsonl", [{"text": f"the {a} sleeps", "label": i % 2} for i, a in enumerate(ANIMALS[:8])])
    out = tmp_path / "cli.safetensors"
    proc = subprocess.run(
        [CAPASERVE, "train", "--task", "sequence-classification", "--data", str(data), "--steps", "2",
         "--batch-size", "4", "--max-length", "12", "--rank", "4", "--copies", "2", "--targets", "query,value",
         "--no-progress", "-o", str(out)],
        capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    meta = load_bundle(out).metadata
    assert meta.base_model == DEFAULT_MODEL_ID and meta.labels == ["0", "1"] and meta.rank == 4
    assert "eval on tiny.jsonl (training data)" in meta.description
    assert "wrote" in proc.stderr
    # a random mask_seed, recorded in the bundle and the log
    assert meta.encoding == "seed" and meta.mask_seed is not None and f"mask_seed {meta.mask_seed}" in proc.stderr
    # 2 steps learn nothing: said before training and again as the last line
    warning = "warning: only 2 optimiser steps (8 training rows, 2 step(s) per epoch at batch 4)"
    lines = proc.stderr.strip().splitlines()
    assert warning in proc.stderr.split("before training")[0] and lines[-1].startswith(warning), proc.stderr


def test_few_steps_warning_threshold():
    from adapters.training.trainer import MIN_LEARNING_STEPS, few_steps_warning

    below = few_steps_warning(MIN_LEARNING_STEPS - 1, per_epoch=3, examples=48, batch_size=16)
    assert below is not None and f"fewer than {MIN_LEARNING_STEPS}" in below and "--epochs (about 34)" in below
    assert few_steps_warning(MIN_LEARNING_STEPS, per_epoch=3, examples=48, batch_size=16) is None


def test_cli_reports_bad_data_with_line_numbers(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "a", "label": 1}\n{"text": "b"}\nnot json\n')
    proc = subprocess.run(
        [CAPASERVE, "train", "--task", "sequence-classification", "--data", str(data), "-o", str(tmp_path / "x.safetensors")],
        capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120,
    )
    assert proc.returncode == 2
    assert f"{data}:2: missing key 'label'" in proc.stderr and f"{data}:3: not valid JSON" in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()
