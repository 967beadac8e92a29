"""Every invalid-bundle case of docs/bundle-format.md#validation, as one table of (name, mutation, expected).

Each case copies a good fixture bundle to tmp_path, mutates the file, then runs both
validation stages (format via load_bundle, servability via check_servable against
MiniLM) and expects one BundleError naming every expected fragment.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapters.bundle import Task, save_bundle
from adapters.errors import BundleError
from adapters.synthetic import random_bundle
from adapters.tasks.model_loader import meta_spec
from adapters.validation import BaseModelSpec, check_servable, load_bundle
from tests.conftest import MINILM_ID

Q = "encoder.layer.0.attention.self.query"
V = "encoder.layer.0.attention.self.value"
FFN = "encoder.layer.1.intermediate.dense"  # 384 -> 1536: not square, catches orientation mix-ups
TARGETS = [Q, V, FFN]
R, D = 4, 2


@pytest.fixture(scope="module")
def minilm_spec(minilm_dir: Path) -> BaseModelSpec:
    return meta_spec(str(minilm_dir), MINILM_ID, Task.FEATURE_EXTRACTION)


@pytest.fixture(scope="module")
def good_bundles(minilm_spec: BaseModelSpec, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("good")
    fe = random_bundle(minilm_spec, TARGETS, rank=R, num_copies=D, seed=1)
    cls = random_bundle(
        minilm_spec, [Q], rank=R, num_copies=D, seed=2, task=Task.SEQUENCE_CLASSIFICATION, labels=["neg", "pos"]
    )
    return {
        "fe": save_bundle(fe, folder / "fe.safetensors"),
        "cls": save_bundle(cls, folder / "cls.safetensors"),
    }


# ---- mutation helpers: each returns a function of the bundle path -------------------------


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def edit(tensors: Callable[[dict], None] | None = None, meta: Callable[[dict], None] | None = None):
    """Rewrite the file with tensors and/or metadata changed in place by the callbacks."""

    def mutate(path: Path) -> None:
        ts, md = _read(path)
        if tensors:
            tensors(ts)
        if meta:
            meta(md)
        save_file(ts, str(path), metadata=md)

    return mutate


def set_meta(**kv: str | None):
    def f(md: dict) -> None:
        for k, v in kv.items():
            if v is None:
                md.pop(k, None)
            else:
                md[k] = v

    return edit(meta=f)


def set_tensor(name: str, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    def f(ts: dict) -> None:
        t = fn(ts[name]) if name in ts else fn(None)
        if t is None:
            ts.pop(name, None)
        else:
            ts[name] = t

    return edit(tensors=f)


def patch_header(fn: Callable[[dict], None]):
    """Edit the raw JSON header (for what safetensors' writer refuses to produce)."""

    def mutate(path: Path) -> None:
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        fn(header)
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])

    return mutate


def write_bytes(data: bytes | Callable[[bytes], bytes]):
    def mutate(path: Path) -> None:
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)

    return mutate


def poke(name: str, value: float):
    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[-1] = value
        return t

    return set_tensor(name, fn)


def rename_target(old: str, new: str):
    def f(ts: dict) -> None:
        for k in [k for k in ts if k.startswith(old + ".")]:
            ts[new + k[len(old) :]] = ts.pop(k)

    def g(md: dict) -> None:
        md["targets"] = json.dumps([new if t == old else t for t in json.loads(md["targets"])])

    return edit(tensors=f, meta=g)


def resize_target(name: str, in_f: int):
    """Consistent factors for an in_features the base layer does not have."""

    def f(ts: dict) -> None:
        ts[f"{name}.lora_A"] = torch.zeros(R, in_f)
        ts[f"{name}.mask_A"] = torch.ones(D, R, in_f, dtype=torch.bool)

    return edit(tensors=f)


def both(*mutations):
    def mutate(path: Path) -> None:
        for m in mutations:
            m(path)

    return mutate


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[Path], None]
    expect: tuple[str, ...]
    fixture: str = "fe"


def case(name, mutate, *expect, fixture="fe") -> Case:
    return Case(name, mutate, expect, fixture)


NOT_ST = "not a valid safetensors file"
CASES = [
    # not a safetensors file
    case("pickle", write_bytes(pickle.dumps({"w": [1.0, 2.0]})), NOT_ST),
    case("torch-save-zip", write_bytes(lambda _: _torch_save_bytes()), NOT_ST),
    case("random-bytes", write_bytes(bytes(range(256)) * 8), NOT_ST),
    case("empty", write_bytes(b""), NOT_ST, "too short"),
    case("truncated", write_bytes(lambda b: b[: len(b) - 64]), NOT_ST, "outside the file"),
    case("header-not-json", write_bytes(struct.pack("<Q", 8) + b"{nojson}" + b"\0" * 16), "header is not JSON"),
    case("header-not-object", write_bytes(struct.pack("<Q", 8) + b"[1, 2]  "), "not a JSON object"),
    case("malformed-entry", patch_header(lambda h: h[f"{Q}.lora_A"].pop("dtype")), "malformed entry"),
    case("offsets-as-strings", patch_header(lambda h: h[f"{Q}.lora_A"].update(data_offsets=["0", "64"])), "malformed entry"),
    case("shape-as-string", patch_header(lambda h: h[f"{Q}.lora_A"].update(shape="44")), "malformed entry"),
    case("offsets-reversed", patch_header(lambda h: h[f"{Q}.lora_A"].update(data_offsets=[64, 0])), NOT_ST),
    # keys
    case("missing-tensor", set_tensor(f"{Q}.mask_B", lambda t: None), f"missing tensor '{Q}.mask_B'"),
    case("unexpected-tensor", set_tensor("extra.weight", lambda t: torch.zeros(2)), "unexpected tensor 'extra.weight'"),
    case("head-on-feature-extraction", set_tensor("head.out.weight", lambda t: torch.zeros(2, 384)), "unexpected tensor 'head.out.weight'"),
    case("target-without-tensors", set_meta(targets=json.dumps(TARGETS + ["pooler.dense"])), "missing tensor 'pooler.dense.lora_A'"),
    case("missing-head", set_tensor("head.out.weight", lambda t: None), "missing tensor 'head.out.weight'", fixture="cls"),
    # shapes
    case("lora_A-rows", set_tensor(f"{Q}.lora_A", lambda t: torch.zeros(R + 1, 384)), f"'{Q}.lora_A': expected shape [{R}, 384], got [{R + 1}, 384]"),
    case("lora_B-cols", set_tensor(f"{V}.lora_B", lambda t: torch.zeros(384, R - 1)), f"'{V}.lora_B': expected shape [384, {R}]"),
    case("lora_B-1d", set_tensor(f"{V}.lora_B", lambda t: torch.zeros(384)), "must be 2-D"),
    case("mask_A-copies", set_tensor(f"{Q}.mask_A", lambda t: t[:1]), f"'{Q}.mask_A': expected shape [{D}, {R}, 384], got [1, {R}, 384]"),
    case("mask_B-transposed", set_tensor(f"{FFN}.mask_B", lambda t: t.transpose(1, 2).contiguous()), f"'{FFN}.mask_B': expected shape [{D}, 1536, {R}]"),
    case("rank-vs-tensors", set_meta(rank="3"), f"'{Q}.lora_A': expected shape [3, 384], got [{R}, 384]"),
    case("copies-vs-masks", set_meta(num_copies="3"), f"'{Q}.mask_A': expected shape [3, {R}, 384]"),
    case("head-vs-labels", set_meta(labels='["a", "b", "c"]'), "'head.out.weight': expected shape [3, 384]", fixture="cls"),
    case("head-dense-shape", set_tensor("head.dense.weight", lambda t: t[:, :10].contiguous()), "'head.dense.weight': expected shape [384, 384]", fixture="cls"),
    # dtypes and values
    case("mask-uint8", set_tensor(f"{Q}.mask_A", lambda t: t.to(torch.uint8)), "expected a bool mask, got dtype U8"),
    case("mask-float", set_tensor(f"{Q}.mask_B", lambda t: t.float()), "expected a bool mask, got dtype F32"),
    case("weight-int", set_tensor(f"{Q}.lora_A", lambda t: t.to(torch.int32)), "expected a float16, bfloat16 or float32 weight, got dtype I32"),
    case("weight-bool", set_tensor(f"{Q}.lora_B", lambda t: t > 0), "got dtype BOOL"),
    case("weight-float64", set_tensor(f"{Q}.lora_A", lambda t: t.double()), "got dtype F64"),
    case("nan", poke(f"{V}.lora_A", float("nan")), f"tensor '{V}.lora_A' holds NaN or Inf"),
    case("inf", poke(f"{FFN}.lora_B", float("inf")), f"tensor '{FFN}.lora_B' holds NaN or Inf"),
    case("nan-bf16", set_tensor(f"{Q}.lora_B", lambda t: t.to(torch.bfloat16).index_fill(0, torch.tensor([0]), float("nan"))), "holds NaN or Inf"),
    case("nan-head", poke("head.out.bias", float("nan")), "'head.out.bias' holds NaN or Inf", fixture="cls"),
    # metadata
    case("no-metadata", patch_header(lambda h: h.pop("__metadata__")), "no __metadata__"),
    case("empty-metadata", edit(meta=lambda md: md.clear()), "missing metadata key 'format'", "missing metadata key 'targets'"),
    case("metadata-not-object", patch_header(lambda h: h.update(__metadata__=["x"])), "__metadata__ is not an object"),
    case("missing-rank", set_meta(rank=None), "missing metadata key 'rank'"),
    case("missing-targets", set_meta(targets=None), "missing metadata key 'targets'"),
    case("format", set_meta(format="capaboost.v2"), "metadata 'format' must be 'capaboost.v1', got 'capaboost.v2'"),
    case("rank-float", set_meta(rank="8.5"), "metadata 'rank' must be an integer, got '8.5'"),
    case("rank-word", set_meta(rank="eight"), "metadata 'rank' must be an integer"),
    case("rank-zero", set_meta(rank="0"), "metadata 'rank'", "greater than or equal to 1"),
    case("num_copies-zero", set_meta(num_copies="0"), "metadata 'num_copies'", "greater than or equal to 1"),
    case("alpha-nan", set_meta(alpha="nan"), "alpha must be a finite number"),
    case("alpha-inf", set_meta(alpha="-inf"), "alpha must be a finite number"),
    case("alpha-word", set_meta(alpha="sixteen"), "metadata 'alpha'"),
    case("density-zero", set_meta(density="0"), "metadata 'density'", "greater than 0"),
    case("density-above-one", set_meta(density="1.5"), "metadata 'density'", "less than or equal to 1"),
    case("targets-not-json", set_meta(targets="encoder.layer.0.attention.self.query"), "metadata 'targets' must be a JSON list"),
    case("targets-not-list", set_meta(targets='{"a": 1}'), "metadata 'targets' must be a JSON list of strings"),
    case("targets-empty", set_meta(targets="[]"), "metadata 'targets'"),
    case("targets-repeat", set_meta(targets=json.dumps([Q, Q, V, FFN])), "must not repeat"),
    case("task", set_meta(task="translation"), "metadata 'task'"),
    case("unknown-key", set_meta(temperature="0.7"), "unexpected metadata key 'temperature'"),
    case("metadata-not-string", patch_header(lambda h: h["__metadata__"].update(rank=4)), "metadata 'rank' must be a string, got int"),
    case("labels-missing", set_meta(labels=None), "labels is required for task sequence-classification", fixture="cls"),
    case("labels-not-json", set_meta(labels="neg,pos"), "metadata 'labels' must be a JSON list", fixture="cls"),
    case("pooling-missing", set_meta(pooling=None), "pooling is required", fixture="cls"),
    case("pooling-bad", set_meta(pooling="max"), "metadata 'pooling'", fixture="cls"),
    case("labels-on-feature-extraction", set_meta(labels='["a"]', pooling="cls"), "only allowed for task sequence-classification"),
    # servability against the MiniLM base
    case("base-mismatch", set_meta(base_model="bert-base-uncased"), f"base_model 'bert-base-uncased' does not match the served base '{MINILM_ID}'"),
    case("target-not-in-model", rename_target(Q, "encoder.layer.0.attention.self.nope"), "target 'encoder.layer.0.attention.self.nope' is not a Linear module"),
    case("target-is-not-linear", rename_target(Q, "encoder.layer.0.attention.output.LayerNorm"), "is not a Linear module"),
    case("shape-does-not-fit", resize_target(Q, 100), f"target '{Q}': base layer is [out=384, in=384], adapter is [out=384, in=100]"),
    case("task-not-servable", set_meta(task="causal-lm"), "task 'causal-lm' cannot be served on a feature-extraction base model"),
    # every problem at once
    case(
        "several-format-problems",
        both(
            set_tensor(f"{Q}.mask_B", lambda t: None),
            set_tensor(f"{V}.lora_A", lambda t: t.to(torch.int32)),
            set_tensor(f"{FFN}.mask_A", lambda t: t.to(torch.uint8)),
            set_tensor("stray", lambda t: torch.zeros(1)),
        ),
        f"missing tensor '{Q}.mask_B'", "unexpected tensor 'stray'", "got dtype I32", "got dtype U8",
    ),
    case(
        "several-metadata-problems",
        set_meta(rank="x", alpha="nan", density="2", format="v0", extra="1"),
        "metadata 'rank' must be an integer", "metadata 'format' must be", "unexpected metadata key 'extra'",
    ),
    case(
        "several-servability-problems",
        both(set_meta(base_model="other"), rename_target(V, "nope"), resize_target(FFN, 7)),
        "does not match the served base", "target 'nope' is not a Linear module", f"target '{FFN}': base layer",
    ),
]


def _torch_save_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({f"{Q}.lora_A": torch.zeros(R, 384)}, buf)
    return buf.getvalue()


def test_good_bundles_pass(good_bundles: dict[str, Path], minilm_spec: BaseModelSpec) -> None:
    for path in good_bundles.values():
        check_servable(load_bundle(path), minilm_spec)
        check_servable(load_bundle(path.read_bytes()), minilm_spec)


def test_case_names_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_invalid_bundle_rejected(
    c: Case, good_bundles: dict[str, Path], minilm_spec: BaseModelSpec, tmp_path: Path
) -> None:
    path = tmp_path / "bundle.safetensors"
    shutil.copy(good_bundles[c.fixture], path)
    c.mutate(path)
    with pytest.raises(BundleError) as info:
        check_servable(load_bundle(path), minilm_spec)
    message = str(info.value)
    for fragment in c.expect:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if len(c.expect) > 1 and c.name.startswith("several"):
        assert len(info.value.problems) >= len(c.expect)
