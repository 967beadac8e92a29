"""Prepacked bfloat16 weights (serving/engine/packed.py): the same outputs as torch's own
linear bit for bit (fused post-ops within the bfloat16 bound), a repack after every in-place
write, and packing only where it applies."""

from __future__ import annotations

import pytest
import torch

from adapters.bundle import Task
from adapters.precision import COSINE_BOUND
from serving.engine.packed import PackedLinear, pack_linears, packing_applies, unpack_linears
from serving.engine.sampling import SamplingParams
from tests.engine_utils import MINILM_ID, bundle_for, engine_for, plain_model

HERE = packing_applies(torch.device("cpu"), torch.bfloat16)
needs_packing = pytest.mark.skipif(not HERE, reason="this CPU has no oneDNN bfloat16")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _hidden(model: torch.nn.Module, tokenizer, task: Task) -> torch.Tensor:
    batch = dict(tokenizer(["prepacked weights must not change a bit", "hi"], padding=True, return_tensors="pt"))
    with torch.inference_mode():
        out = model(**batch)
    return (out.logits if task is Task.CAUSAL_LM else out.last_hidden_state).clone()


@needs_packing
@pytest.mark.parametrize("case", ["minilm", "llama"])
def test_packed_model_equals_plain_transformers_bit_for_bit(case: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue("minilm_dir" if case == "minilm" else "tiny_llama_dir")
    engine = engine_for(folder, MINILM_ID if case == "minilm" else None, dtype="bfloat16")
    linears = sum(isinstance(m, torch.nn.Linear) for m in engine.model.modules())
    assert engine.packed_layers == linears > 0
    assert all(type(m) is PackedLinear for m in engine.model.modules() if isinstance(m, torch.nn.Linear))
    plain = plain_model(folder, engine.task, torch.bfloat16)
    assert not any(type(m) is PackedLinear for m in plain.modules())
    assert torch.equal(_hidden(engine.model, engine.tokenizer, engine.task), _hidden(plain, engine.tokenizer, engine.task))


@needs_packing
def test_adapters_and_swaps_on_packed_weights_equal_the_unpacked_model(minilm_dir) -> None:
    engine = engine_for(minilm_dir, MINILM_ID, dtype="bfloat16")
    suffixes = ("attention.self.query", "intermediate.dense")
    engine.load_adapter("a", bundle_for(engine, suffixes, seed=1))
    engine.load_adapter("b", bundle_for(engine, suffixes[1:], seed=2))
    texts = ["a swap rewrites the weights", "and the packed copy follows"]
    seen: dict[str | None, list[torch.Tensor]] = {}
    for name in ("a", "b", None, "a"):
        packed = [r.embedding for r in engine.encode(texts, [name] * 2, ["embed"] * 2)]
        unpack_linears(engine.model)  # the same tensors through torch's own linear
        plain = [r.embedding for r in engine.encode(texts, [name] * 2, ["embed"] * 2)]
        pack_linears(engine.model)
        # merged forwards are unpadded with fused post-ops on packed layers (rounded once, not
        # twice), unfused on plain ones: equal within the bfloat16 guard's bound, while a stale
        # packed copy (another adapter's weights) would give a far-off vector
        assert engine.unpadded
        assert all(cosine(p, q) >= COSINE_BOUND for p, q in zip(packed, plain)), name
        if name in seen:
            assert all(torch.equal(p, q) for p, q in zip(packed, seen[name])), "A->B->A must be bit-identical"
        seen[name] = packed
    assert all(cosine(p, q) < 0.9 for p, q in zip(seen["a"], seen[None]))
    assert all(cosine(p, q) < 0.9 for p, q in zip(seen["a"], seen["b"]))
    # mixed (unmerged) rows: forward hooks add each row's update on the packed base (hooked
    # layers unfused, the others fused as in merged forwards): each row is its adapter's vector
    mixed = [r.embedding for r in engine.encode(texts, ["a", "b"], ["embed"] * 2, mixed=True)]
    unpack_linears(engine.model)
    reference = [r.embedding for r in engine.encode(texts, ["a", "b"], ["embed"] * 2, mixed=True)]
    assert all(cosine(p, q) >= COSINE_BOUND for p, q in zip(mixed, reference))
    for i, name in enumerate(("a", "b")):
        assert cosine(mixed[i], seen[name][i]) >= COSINE_BOUND and cosine(mixed[i], seen[None][i]) < 0.9


@needs_packing
def test_every_in_place_write_is_repacked_before_the_next_forward() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96).to(torch.bfloat16)
    pack_linears(lin)
    x = torch.randn(5, 7, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        for write in (lambda w: w.add_(0.5), lambda w: w.copy_(torch.randn_like(w)), lambda w: w.mul_(-1)):
            before = lin(x)
            with torch.no_grad():
                write(lin.weight)
            after = lin(x)
            assert not torch.equal(before, after)
            assert torch.equal(after, torch.nn.functional.linear(x, lin.weight, lin.bias))
        # a non-contiguous input, and no bias
        lin.bias = None
        xt = torch.randn(64, 9, dtype=torch.bfloat16).t()
        assert torch.equal(lin(xt), torch.nn.functional.linear(xt, lin.weight))


def test_packing_only_where_it_applies(tiny_llama_dir) -> None:
    assert not packing_applies(torch.device("cpu"), torch.float32)
    assert not packing_applies(torch.device("meta"), torch.bfloat16)
    assert engine_for(tiny_llama_dir, dtype="float32").packed_layers == 0
    assert engine_for(tiny_llama_dir, dtype="bfloat16", pack_weights="off").packed_layers == 0
    packed = engine_for(tiny_llama_dir, dtype="bfloat16")
    assert (packed.packed_layers > 0) == HERE


@needs_packing
def test_generation_on_packed_weights_gives_the_unpacked_tokens(tiny_llama_dir) -> None:
    engine = engine_for(tiny_llama_dir, dtype="bfloat16")
    engine.load_adapter("g", bundle_for(engine, ("q_proj", "v_proj"), seed=4, task=Task.CAUSAL_LM, std=0.05))
    params = SamplingParams(max_tokens=12, temperature=0)
    prompts = ["the packed", "weights decode", "exactly"]
    packed = [[o.token_ids for o in engine.generate(prompts, a, params)] for a in (None, "g")]
    unpack_linears(engine.model)
    plain = [[o.token_ids for o in engine.generate(prompts, a, params)] for a in (None, "g")]
    assert packed == plain
    assert packed[0] != packed[1]
