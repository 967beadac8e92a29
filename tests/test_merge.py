"""The merge math (docs/merge.md#merge-rule) against two oracles: the unmerged CapaBoostLinear and an
independent float64 loop written straight from the formula; both weight orientations
(nn.Linear [out, in], GPT-2 Conv1D [in, out]); float32, float16 and bfloat16 weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters.bundle import AdapterBundle, BundleMetadata, Task, TargetFactors, save_bundle
from adapters.capaboost_linear import CapaBoostLinear, random_masks, wrap_targets
from adapters.merge import add_dense_into, delta_weight, merge_into, merged_weight, rank_of, stacked_factors
from adapters.validation import load_bundle

IN, OUT, R, D, ALPHA = 48, 40, 4, 2, 12.0
SCALING = ALPHA / R
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: output tolerance of a merged layer in each weight dtype (the cast of W' is the only rounding)
ATOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def factors(seed: int = 0, *, d: int = D, r: int = R, density: float = 0.5, dtype=torch.float32) -> TargetFactors:
    g = torch.Generator().manual_seed(seed)
    return TargetFactors(
        lora_A=(torch.randn(r, IN, generator=g) * 0.2).to(dtype),
        lora_B=(torch.randn(OUT, r, generator=g) * 0.2).to(dtype),
        mask_A=random_masks(d, (r, IN), density, g),
        mask_B=random_masks(d, (OUT, r), density, g),
    )


def loop_delta(f: TargetFactors, scaling: float) -> torch.Tensor:
    """delta_W = (alpha/r) * sum_i (B*M_B[i]) @ (A*M_A[i]), entry by formula, in float64."""
    A, B = f.lora_A.double(), f.lora_B.double()
    total = torch.zeros(B.shape[0], A.shape[1], dtype=torch.float64)
    for i in range(f.mask_A.shape[0]):
        total += (B * f.mask_B[i]) @ (A * f.mask_A[i])
    return scaling * total


def base_layer(kind: str, dtype: torch.dtype, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.Linear(IN, OUT) if kind == "linear" else Conv1D(OUT, IN)
    if kind == "conv1d":
        nn.init.normal_(layer.weight, std=0.1)
        nn.init.normal_(layer.bias, std=0.1)
    return layer.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_matches_independent_loop(dtype: torch.dtype) -> None:
    f = factors(dtype=dtype)
    delta = delta_weight(f, SCALING)
    assert delta.dtype == torch.float32 and delta.shape == (OUT, IN)
    torch.testing.assert_close(delta.double(), loop_delta(f, SCALING), atol=1e-6, rtol=1e-5)


def test_stacked_factors_are_the_rank_dr_lora() -> None:
    f = factors(d=3)
    b, a = stacked_factors(f, SCALING)
    assert b.shape == (OUT, 3 * R) and a.shape == (3 * R, IN)
    # copy i sits in columns / rows i*r .. (i+1)*r
    for i in range(3):
        torch.testing.assert_close(a[i * R : (i + 1) * R], f.lora_A * f.mask_A[i])
        torch.testing.assert_close(b[:, i * R : (i + 1) * R], SCALING * f.lora_B * f.mask_B[i])
    torch.testing.assert_close((b @ a).double(), loop_delta(f, SCALING), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_merged_layer_equals_unmerged(kind: str, dtype: torch.dtype) -> None:
    base = base_layer(kind, dtype)
    f = factors(seed=2)
    x = torch.randn(5, 7, IN).to(dtype)
    unmerged = CapaBoostLinear.from_factors(copy.deepcopy(base), f, ALPHA)

    merged = copy.deepcopy(base)
    b, a = stacked_factors(f, SCALING)
    with torch.no_grad():
        merge_into(merged.weight, base.weight.detach().clone(), b, a, transposed=kind == "conv1d")
    assert merged.weight.dtype == dtype

    # oracle in float64: y = x W'^T + bias with W' = W + loop delta (Linear orientation)
    w = base.weight.double() if kind == "linear" else base.weight.double().t()
    expected = x.double() @ (w + loop_delta(f, SCALING)).t() + base.bias.double()
    with torch.no_grad():
        got_merged, got_unmerged = merged(x), unmerged(x)
    torch.testing.assert_close(got_merged.double(), expected, atol=ATOL[dtype], rtol=ATOL[dtype])
    torch.testing.assert_close(got_unmerged.double(), expected, atol=ATOL[dtype], rtol=ATOL[dtype])
    if dtype == torch.float32:
        torch.testing.assert_close(got_merged, got_unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_into_recomputes_from_pristine(dtype: torch.dtype) -> None:
    """A -> B -> A is bit-identical and matches one cast of pristine + delta, in every dtype."""
    base = base_layer("linear", dtype)
    pristine = base.weight.detach().clone()
    fa, fb = factors(seed=3), factors(seed=4)
    ba, aa = stacked_factors(fa, SCALING)
    bb, ab = stacked_factors(fb, SCALING)
    w = base.weight.detach()
    merge_into(w, pristine, ba, aa)
    first = w.clone()
    torch.testing.assert_close(first, (pristine.float() + delta_weight(fa, SCALING)).to(dtype), atol=0, rtol=0)
    merge_into(w, pristine, bb, ab)
    assert not torch.equal(w, first)
    merge_into(w, pristine, ba, aa)
    assert torch.equal(w, first)
    add_dense_into(w, pristine, delta_weight(fb, SCALING))
    torch.testing.assert_close(w, merged_weight(pristine, bb, ab).to(dtype), atol=ATOL[dtype], rtol=0)


def test_rank_exceeds_r_with_masked_copies() -> None:
    """d = 2 copies at density 0.5 give rank 2r; one all-true copy (plain LoRA) gives r."""
    capa = factors(seed=5, d=2, density=0.5)
    k = rank_of(capa, SCALING)
    assert k == 2 * R > R
    assert k == int(torch.linalg.matrix_rank(loop_delta(capa, SCALING)))
    plain = factors(seed=5, d=1, density=1.0)
    assert rank_of(plain, SCALING) == R
    zero = TargetFactors(capa.lora_A, torch.zeros_like(capa.lora_B), capa.mask_A, capa.mask_B)
    assert rank_of(zero, SCALING) == 0


def test_model_merge_equals_unmerged_model(tiny_gpt2_dir: Path) -> None:
    """A whole GPT-2 (Conv1D targets): merged weights vs wrap_targets' unmerged forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    targets = {"transformer.h.0.attn.c_attn": (192, 64), "transformer.h.1.mlp.c_fc": (256, 64)}
    g = torch.Generator().manual_seed(6)
    fs = {
        t: TargetFactors(
            lora_A=torch.randn(R, i, generator=g) * 0.1,
            lora_B=torch.randn(o, R, generator=g) * 0.1,
            mask_A=random_masks(D, (R, i), 0.5, g),
            mask_B=random_masks(D, (o, R), 0.5, g),
        )
        for t, (o, i) in targets.items()
    }
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for t, f in fs.items():
            w = merged.get_submodule(t).weight
            merge_into(w, w.detach().clone(), *stacked_factors(f, SCALING), transposed=True)
    unmerged = wrap_targets(copy.deepcopy(model), fs, ALPHA)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    with torch.no_grad():
        a, b, base = merged(ids).logits, unmerged(ids).logits, model(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - base).abs().max() > 1e-3  # the adapter does something


@pytest.mark.parametrize("dtype", DTYPES)
def test_bundle_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    fs = {"layer.0.q": factors(seed=7, dtype=dtype), "layer.0.v": factors(seed=8, dtype=dtype, d=2)}
    meta = BundleMetadata(
        base_model="some/base",
        task=Task.CAUSAL_LM,
        rank=R,
        num_copies=D,
        alpha=ALPHA,
        density=0.5,
        targets=list(fs),
        description="round trip",
    )
    bundle = AdapterBundle(metadata=meta, targets=fs)
    path = save_bundle(bundle, tmp_path / "sub" / "b.safetensors")
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    back = load_bundle(path)
    assert back.metadata == meta
    assert back.tensors().keys() == bundle.tensors().keys()
    for k, v in bundle.tensors().items():
        assert back.tensors()[k].dtype == v.dtype and torch.equal(back.tensors()[k], v), k
    for t in fs:
        assert torch.equal(delta_weight(back.targets[t], back.metadata.scaling), delta_weight(fs[t], SCALING))
    assert load_bundle(path.read_bytes()).metadata == meta
