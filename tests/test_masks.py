"""Mask encodings (docs/bundle-format.md#mask-encodings): the seed generator written again
here in plain Python ints, the packed bit order, strict validation of every encoding, and
each encoding served by the engine equal to a hand merge of what the file holds, decoded
by this file's own code."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from adapters import masks
from adapters.bundle import AdapterBundle, Task, save_bundle
from adapters.errors import BundleError
from adapters.synthetic import random_bundle
from adapters.validation import BaseModelSpec, load_bundle
from adapters.tasks.model_loader import meta_spec
from tests.engine_utils import MINILM_ID, embed, engine_for, plain_model

M64 = (1 << 64) - 1
Q = "encoder.layer.0.attention.self.query"
V = "encoder.layer.0.attention.self.value"
FFN = "encoder.layer.1.intermediate.dense"  # 384 -> 1536: not square


# ---- the format's generator and bit order, written again from the format's words ------------


def plain_splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def plain_seed_bits(mask_seed: int, target: str, matrix: str, n: int, density: float) -> list[bool]:
    key = struct.unpack("<Q", hashlib.sha256(f"{mask_seed}/{target}/{matrix}".encode()).digest()[:8])[0]
    limit = int(density * 2**53)  # exact: a power-of-two scaling, then floor of a positive number
    return [(plain_splitmix64((key + j) & M64) >> 11) < limit for j in range(n)]


def plain_seed_mask(mask_seed: int, target: str, matrix: str, shape: tuple[int, ...], density: float) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.tensor(plain_seed_bits(mask_seed, target, matrix, n, density), dtype=torch.bool).reshape(shape)


def plain_unpack(data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    bits = [bool(data[j // 8] >> (7 - j % 8) & 1) for j in range(n)]
    return torch.tensor(bits, dtype=torch.bool).reshape(shape)


def test_worked_example_of_the_format() -> None:
    expected = [1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 0, 0, 0, 1, 1, 0]
    got = masks.seed_mask(42, Q, "A", (2, 8, 384), 0.5)
    assert got[0, 0, :16].int().tolist() == expected
    assert [int(b) for b in plain_seed_bits(42, Q, "A", 16, 0.5)] == expected


@pytest.mark.parametrize(
    ("seed", "target", "matrix", "shape", "density"),
    [
        (0, Q, "A", (2, 4, 384), 0.5),
        (42, V, "B", (3, 384, 4), 0.25),
        (2**64 - 1, "h.0.attn.c_attn", "A", (1, 3, 5), 0.9),  # the largest seed; 15 elements (not whole bytes)
        (7, FFN, "B", (4, 1536, 2), 1.0),  # density 1: every element kept
        (123456789, "x", "A", (2, 1, 7), 1e-9),
    ],
)
def test_generator_equals_the_plain_python_one(seed, target, matrix, shape, density) -> None:
    assert torch.equal(masks.seed_mask(seed, target, matrix, shape, density), plain_seed_mask(seed, target, matrix, shape, density))


def test_counter_wraps_mod_2_64() -> None:
    # no findable target has a key this close to 2^64, so the wrap is checked on the counters
    key = M64 - 3
    with np.errstate(over="ignore"):
        ours = masks.splitmix64(np.uint64(key) + np.arange(8, dtype=np.uint64))
    assert [int(x) for x in ours] == [plain_splitmix64((key + j) & M64) for j in range(8)]


def test_packed_bit_order_and_pad_bits() -> None:
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0], dtype=torch.bool).reshape(1, 1, 11)
    packed = masks.pack(mask)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b10000001, 0b11000000]
    assert torch.equal(masks.unpack(packed, (1, 1, 11)), mask)
    assert masks.pad_bits_clear(packed, 11)
    assert not masks.pad_bits_clear(torch.tensor([0x81, 0xC1], dtype=torch.uint8), 11)


# ---- bundles in every encoding ---------------------------------------------------------------


@pytest.fixture(scope="module")
def spec(minilm_dir: Path) -> BaseModelSpec:
    return meta_spec(str(minilm_dir), MINILM_ID, Task.FEATURE_EXTRACTION)


def encoded(spec: BaseModelSpec, encoding: str, seed: int = 5, **kw) -> AdapterBundle:
    b = random_bundle(spec, [Q, V, FFN], rank=4, num_copies=3, seed=seed, std=0.2,
                      mask_encoding="seed" if encoding == "seed" else None, **kw)
    return b if encoding == "seed" else b.with_encoding(encoding)  # type: ignore[arg-type]


def file_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def test_files_hold_what_each_encoding_says(spec, tmp_path) -> None:
    sizes = {}
    for enc in ("dense", "packed", "seed"):
        path = save_bundle(encoded(spec, enc), tmp_path / f"{enc}.safetensors")
        tensors, header = file_parts(path)
        sizes[enc] = path.stat().st_size
        a = tensors.get(f"{Q}.mask_A")
        if enc == "dense":
            assert header.get("mask_encoding", "dense") == "dense" and a is not None and a.dtype == torch.bool and a.shape == (3, 4, 384)
        elif enc == "packed":
            assert header["mask_encoding"] == "packed" and a.dtype == torch.uint8 and a.shape == (3 * 4 * 384 // 8,)
            assert tensors[f"{Q}.mask_B"].shape == (3 * 384 * 4 // 8,)
        else:
            assert header["mask_encoding"] == "seed" and header["mask_seed"] == "5"
            assert not [k for k in tensors if ".mask_" in k]
    assert sizes["seed"] < sizes["packed"] < sizes["dense"]


def test_every_encoding_reads_back_the_same_masks(spec, tmp_path) -> None:
    dense = encoded(spec, "seed").with_encoding("dense")
    for enc in ("dense", "packed", "seed"):
        b = dense.with_encoding(enc, 5 if enc == "seed" else None)  # type: ignore[arg-type]
        back = load_bundle(save_bundle(b, tmp_path / f"{enc}.safetensors"))
        assert back.metadata.encoding == enc
        for t, f in dense.targets.items():
            assert torch.equal(back.targets[t].mask_A, f.mask_A) and torch.equal(back.targets[t].mask_B, f.mask_B)


def test_seed_encoding_refuses_masks_it_cannot_generate(spec, tmp_path) -> None:
    b = encoded(spec, "packed")  # torch-drawn masks
    with pytest.raises(BundleError, match="mask_seed 9 and density 0.5 generate"):
        b.with_encoding("seed", 9)
    assert not list(tmp_path.iterdir())


def test_sha256_covers_the_seed(spec, tmp_path) -> None:
    one = save_bundle(encoded(spec, "seed", seed=5), tmp_path / "a.safetensors").read_bytes()
    two_bundle = random_bundle(spec, [Q, V, FFN], rank=4, num_copies=3, seed=5, std=0.2, mask_encoding="seed", mask_seed=6)
    two = save_bundle(two_bundle, tmp_path / "b.safetensors").read_bytes()
    assert hashlib.sha256(one).digest() != hashlib.sha256(two).digest()


# ---- strict validation -----------------------------------------------------------------------


def rewrite(path: Path, *, header: dict[str, str | None] | None = None, tensors: dict[str, torch.Tensor | None] | None = None) -> bytes:
    t, h = file_parts(path)
    for k, v in (header or {}).items():
        h.pop(k) if v is None else h.__setitem__(k, v)
    for k, v in (tensors or {}).items():
        t.pop(k) if v is None else t.__setitem__(k, v)
    return save(t, metadata=h)


def bad_cases(tmp: Path, spec: BaseModelSpec) -> dict[str, tuple[bytes, list[str]]]:
    """name -> (file bytes, fragments the error must contain)."""
    packed = save_bundle(encoded(spec, "packed"), tmp / "packed.safetensors")
    seed = save_bundle(encoded(spec, "seed"), tmp / "seed.safetensors")
    dense = save_bundle(encoded(spec, "dense"), tmp / "dense.safetensors")
    pt, _ = file_parts(packed)
    a = pt[f"{Q}.mask_A"]
    b_odd = pt[f"{V}.mask_B"].clone()
    return {
        "packed-short": (rewrite(packed, tensors={f"{Q}.mask_A": a[:-1]}),
                         [f"tensor '{Q}.mask_A': expected shape [576], got [575]"]),
        "packed-bool": (rewrite(packed, tensors={f"{Q}.mask_A": torch.ones(576, dtype=torch.bool)}),
                        [f"'{Q}.mask_A': expected a packed mask (uint8"]),
        "packed-2d": (rewrite(packed, tensors={f"{Q}.mask_A": a.reshape(3, 192)}), ["expected shape [576], got [3, 192]"]),
        "dense-as-packed": (rewrite(dense, header={"mask_encoding": "packed"}),
                            [f"tensor '{Q}.mask_A': expected shape [576], got [3, 4, 384]", "got dtype BOOL"]),
        "unknown-encoding": (rewrite(dense, header={"mask_encoding": "rle"}), ["mask_encoding", "'rle'"]),
        "seed-with-masks": (rewrite(seed, tensors={f"{Q}.mask_A": a}),
                            [f"unexpected tensor '{Q}.mask_A' (mask_encoding seed stores no mask tensors)"]),
        "seed-missing-seed": (rewrite(seed, header={"mask_seed": None}), ["mask_encoding seed needs mask_seed"]),
        "seed-negative": (rewrite(seed, header={"mask_seed": "-1"}), ["'mask_seed' must be a decimal integer", "'-1'"]),
        "seed-2^64": (rewrite(seed, header={"mask_seed": str(2**64)}), ["'mask_seed' must be below 2^64"]),
        "seed-not-decimal": (rewrite(seed, header={"mask_seed": "0x2a"}), ["'mask_seed' must be a decimal integer"]),
        "seed-leading-zero": (rewrite(seed, header={"mask_seed": "042"}), ["without sign or leading zeros"]),
        "seed-density-0": (rewrite(seed, header={"density": "0"}), ["density", "greater than 0"]),
        "seed-density-above-1": (rewrite(seed, header={"density": "1.5"}), ["density", "less than or equal to 1"]),
        "mask_seed-on-dense": (rewrite(dense, header={"mask_seed": "3"}), ["mask_seed is only allowed with mask_encoding seed"]),
        "several-at-once": (rewrite(packed, tensors={f"{Q}.mask_A": a[:-1], f"{V}.mask_B": b_odd[:-2]}),
                            [f"'{Q}.mask_A': expected shape [576]", f"'{V}.mask_B': expected shape [576]"]),
    }


def test_bad_encodings_are_refused_listing_every_problem(spec, tmp_path) -> None:
    failures = []
    for case, (data, parts) in bad_cases(tmp_path, spec).items():
        try:
            load_bundle(data)
        except BundleError as exc:
            missing = [p for p in parts if p not in str(exc)]
            if missing:
                failures.append(f"{case}: {missing} not in {exc}")
        else:
            failures.append(f"{case}: accepted")
    assert not failures, "\n".join(failures)


def test_pad_bits_must_be_zero(spec, tmp_path) -> None:
    # MiniLM's layers give whole bytes; a [3, 5] layer gives masks of 5 and 3 bits
    odd = BaseModelSpec(model_id=MINILM_ID, task=Task.FEATURE_EXTRACTION, hidden_size=384, linear_shapes={"odd": (3, 5)})
    b = random_bundle(odd, ["odd"], rank=1, num_copies=1, seed=1).with_encoding("packed")
    path = save_bundle(b, tmp_path / "odd.safetensors")
    assert torch.equal(load_bundle(path).targets["odd"].mask_A, b.targets["odd"].mask_A)
    t, _ = file_parts(path)
    dirty = t["odd.mask_A"].clone()
    dirty[-1] |= 1
    with pytest.raises(BundleError, match="'odd.mask_A': the pad bits after the last mask element must be 0"):
        load_bundle(rewrite(path, tensors={"odd.mask_A": dirty}))


# ---- served: each encoding equal to a hand merge of the file, decoded here ----------------------


def hand_merged_embeddings(minilm_dir: Path, path: Path, texts: list[str]) -> torch.Tensor:
    """Embeddings of a plain transformers MiniLM whose target weights are W + delta_W, with the
    masks decoded from the file by this test's own code."""
    from transformers import AutoTokenizer

    tensors, h = file_parts(path)
    enc, d, r = h.get("mask_encoding", "dense"), int(h["num_copies"]), int(h["rank"])
    model = plain_model(minilm_dir, Task.FEATURE_EXTRACTION)
    with torch.no_grad():
        for t in json.loads(h["targets"]):
            a, b = tensors[f"{t}.lora_A"].double(), tensors[f"{t}.lora_B"].double()
            shapes = {"A": (d, r, a.shape[1]), "B": (d, b.shape[0], r)}
            if enc == "seed":
                m = {x: plain_seed_mask(int(h["mask_seed"]), t, x, s, float(h["density"])) for x, s in shapes.items()}
            elif enc == "packed":
                m = {x: plain_unpack(bytes(tensors[f"{t}.mask_{x}"].tolist()), s) for x, s in shapes.items()}
            else:
                m = {x: tensors[f"{t}.mask_{x}"] for x in shapes}
            delta = sum((b * m["B"][i]) @ (a * m["A"][i]) for i in range(d)) * (float(h["alpha"]) / r)
            w = model.get_submodule(t).weight
            w.copy_((w.double() + delta).to(w.dtype))
        tok = AutoTokenizer.from_pretrained(str(minilm_dir))
        batch = tok(texts, padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1)


def test_engine_serves_every_encoding_equal_to_a_hand_merge(minilm_dir, spec, tmp_path) -> None:
    texts = ["a packed mask", "seeded masks cost nothing", "dense is the default"]
    engine = engine_for(minilm_dir, MINILM_ID)
    base = embed(engine, texts).embeddings
    for enc in ("dense", "packed", "seed"):
        path = save_bundle(encoded(spec, enc, seed=11), tmp_path / f"{enc}.safetensors")
        engine.load_adapter(enc, load_bundle(path))
        got = embed(engine, texts, enc).embeddings
        want = hand_merged_embeddings(minilm_dir, path, texts)
        assert torch.allclose(got, want, atol=2e-5), enc
        assert not torch.allclose(got, base, atol=1e-3), enc  # the adapter visibly changes outputs


def test_packed_target_masks_are_the_files_packed_bits(spec, tmp_path) -> None:
    path = save_bundle(encoded(spec, "packed"), tmp_path / "p.safetensors")
    tensors, _ = file_parts(path)
    got = {t: (a, b) for t, a, b in masks.packed_target_masks(load_bundle(path).targets)}
    assert list(got) == [Q, V, FFN]
    for t, (a, b) in got.items():
        assert torch.equal(a, tensors[f"{t}.mask_A"]) and torch.equal(b, tensors[f"{t}.mask_B"])
