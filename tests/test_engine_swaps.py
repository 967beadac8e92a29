"""In-place swaps: A->B->A bit-identical, the base restored bit-exactly after 100 random
swaps (float32 and bfloat16), tensor identity kept, invalid bundles change nothing, the
LRU stays within its byte bound."""

from __future__ import annotations

from collections.abc import Iterator

import random
import re

import pytest
import torch

from adapters.bundle import Task
from adapters.errors import BundleError
from adapters.tasks.errors import AdapterNotLoaded
from adapters.tasks.errors import Overloaded
from serving.api.errors import status_for
from serving.engine.adapter_cache import held_bytes, planned_bytes
from serving.engine.engine import Engine
from tests.engine_utils import MINILM_ID, bundle_for, engine_for, same_weights, weights_snapshot

MINILM_TARGETS = ("attention.self.query", "attention.self.key", "attention.output.dense")
GPT2_TARGETS = ("attn.c_attn", "mlp.c_proj")


def _outputs(engine: Engine) -> torch.Tensor:
    batch = dict(engine.tokenizer(["a swap must never leak", "hi"], padding=True, return_tensors="pt"))
    with torch.inference_mode():
        out = engine.model(**batch)
    return (out.logits if engine.task is Task.CAUSAL_LM else out.last_hidden_state).clone()


@pytest.mark.parametrize(
    "case,dtype",
    [("minilm", "float32"), ("minilm", "bfloat16"), ("gpt2", "float32"), ("gpt2", "bfloat16")],
)
def test_random_swaps_are_exact(case: str, dtype: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue("minilm_dir" if case == "minilm" else "tiny_gpt2_dir")
    suffixes = MINILM_TARGETS if case == "minilm" else GPT2_TARGETS
    engine = engine_for(folder, MINILM_ID if case == "minilm" else None, dtype=dtype, dense_budget_bytes=0)
    assert engine.dtype == getattr(torch, dtype)
    base_w = weights_snapshot(engine.model)
    base_out = _outputs(engine)
    ptrs = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    objs = {n: p for n, p in engine.model.named_parameters()}
    # "a" dense, "b" factors, "c" dense on overlapping and disjoint targets
    engine.residency.cache.dense_budget = 1 << 40
    engine.load_adapter("a", bundle_for(engine, suffixes, seed=1))
    engine.residency.cache.dense_budget = 0
    engine.load_adapter("b", bundle_for(engine, suffixes[:1], seed=2))
    engine.residency.cache.dense_budget = 1 << 40
    engine.load_adapter("c", bundle_for(engine, suffixes[1:], seed=3))
    assert [i.mode for i in engine.list_adapters()] == ["dense", "factors", "dense"]

    refs: dict[str | None, torch.Tensor] = {None: base_out}
    for name in ("a", "b", "c"):
        engine.activate(name)
        refs[name] = _outputs(engine)
        assert not torch.equal(refs[name], base_out)
    engine.activate("a")
    engine.activate("b")
    engine.activate("a")
    assert torch.equal(_outputs(engine), refs["a"]), "A->B->A must be bit-identical"

    rng = random.Random(0)
    for _ in range(100):
        name = rng.choice([None, "a", "b", "c"])
        engine.activate(name)
        if rng.random() < 0.1:
            assert torch.equal(_outputs(engine), refs[name])
    engine.activate(None)
    assert same_weights(engine.model, base_w), "the base must be restored bit-exactly"
    assert torch.equal(_outputs(engine), base_out)
    assert all(p is objs[n] and p.data_ptr() == ptrs[n] for n, p in engine.model.named_parameters())
    assert engine.stats().swaps >= 50


@pytest.fixture(scope="module")
def _minilm_engine(minilm_dir) -> Engine:
    return engine_for(minilm_dir, MINILM_ID)


@pytest.fixture()
def minilm(_minilm_engine: Engine) -> Iterator[Engine]:
    """One MiniLM engine for the module, emptied and given its default budgets for each test."""
    e = _minilm_engine
    yield e
    e.activate(None)
    for info in e.list_adapters():
        e.unload_adapter(info.name)
    e.residency.cache.capacity, e.residency.cache.dense_budget = e.config.adapter_cache_bytes, e.config.dense_budget_bytes


def _set_meta(b, **changes):
    b.metadata = b.metadata.model_copy(update=changes)
    return b


def _unknown_target(b):
    last = b.metadata.targets[-1]
    b.targets["encoder.nope"] = b.targets.pop(last)
    return _set_meta(b, targets=[*b.metadata.targets[:-1], "encoder.nope"])


def _shape_mismatch(b):
    f = b.targets[b.metadata.targets[0]]
    f.lora_A, f.mask_A = f.lora_A[:, :-1], f.mask_A[:, :, :-1]
    return b


def _overflowing_product(b):
    """Finite factors whose merged delta B'A' overflows float32 (the bound check must compute it)."""
    f = b.targets[b.metadata.targets[0]]
    f.lora_A, f.lora_B = torch.full_like(f.lora_A, 1e20), torch.full_like(f.lora_B, 1e20)
    return b


ERROR_CASES = [
    ("wrong base model", lambda b: _set_meta(b, base_model="other/model"), "does not match the served base"),
    ("causal-lm on an encoder", lambda b: _set_meta(b, task=Task.CAUSAL_LM), "cannot be served on a feature-extraction"),
    ("target not in model", _unknown_target, "'encoder.nope' is not a Linear module"),
    ("shape mismatch", _shape_mismatch, "adapter is [out=384, in=383]"),
    ("merged delta overflows", _overflowing_product, "merged delta is not finite"),
]


@pytest.mark.parametrize("name,mutate,message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_invalid_bundle_changes_nothing(minilm: Engine, name: str, mutate, message: str) -> None:
    minilm.load_adapter("good", bundle_for(minilm, MINILM_TARGETS, seed=1))
    minilm.activate("good")
    before_w, before_list, before_stats = weights_snapshot(minilm.model), minilm.list_adapters(), minilm.stats()
    bad = mutate(bundle_for(minilm, MINILM_TARGETS, seed=2))
    for adapter_name in ("bad", "good"):  # new name, and replacing the active adapter
        with pytest.raises(BundleError, match=re.escape(message)) as err:
            minilm.load_adapter(adapter_name, bad)
        assert status_for(err.value)[0] == 400
        assert same_weights(minilm.model, before_w)
        assert minilm.list_adapters() == before_list
        assert minilm.stats() == before_stats


def test_tied_target_rejected(tiny_gpt2_dir) -> None:
    engine = engine_for(tiny_gpt2_dir)
    with pytest.raises(BundleError, match="tied"):
        engine.load_adapter("x", bundle_for(engine, ("lm_head",), seed=1))


def test_lru_bounded_in_bytes_never_evicts_active_or_leased(minilm: Engine) -> None:
    before = minilm.stats()
    minilm.residency.cache.dense_budget = 0  # all factors: equal sizes
    bundles = {n: bundle_for(minilm, MINILM_TARGETS, seed=i) for i, n in enumerate("abcde")}
    probe = minilm.load_adapter("probe", bundles["a"])
    minilm.unload_adapter("probe")
    held = probe.nbytes  # held compact: factors and packed masks
    assert held == held_bytes(bundles["a"]) and not minilm.residency.cache.built_names()
    built = planned_bytes(bundles["a"])[1]  # the float32 factor pair it is built into when active
    assert built > held  # so three held fit where two and a built form do
    minilm.residency.cache.capacity = 2 * held + built + held // 2  # room for two, one of them built
    for n in "ab":
        minilm.load_adapter(n, bundles[n])
    minilm.activate("a")  # a is active (built) and most recently used
    minilm.load_adapter("c", bundles["c"])  # a's built form is in use: evicts b (LRU)
    assert [i.name for i in minilm.list_adapters()] == ["a", "c"]
    with minilm.residency.lease(["c"]):  # as a request or stream in progress holds it
        minilm.activate(None)
        minilm.load_adapter("d", bundles["d"])  # a's built form, no longer in use, gives way: no eviction
        assert [i.name for i in minilm.list_adapters()] == ["a", "c", "d"]
        minilm.activate("d")  # d built: c leased, so a (the LRU) is evicted
        assert [i.name for i in minilm.list_adapters()] == ["c", "d"]
        s = minilm.stats()
        assert s.cache_evictions - before.cache_evictions == 2 and s.cache_misses - before.cache_misses == 5 and s.cache_bytes <= minilm.residency.cache.capacity
        with pytest.raises(Overloaded):  # c leased, d active (its built form in use): no room
            minilm.load_adapter("e", bundles["e"])
    minilm.activate(None)
    minilm.load_adapter("e", bundles["e"])  # lease over, d inactive: d's built form gives way
    assert [i.name for i in minilm.list_adapters()] == ["c", "d", "e"]
    with pytest.raises(AdapterNotLoaded) as err:
        minilm.activate("a")
    assert status_for(err.value)[0] == 404
    assert minilm.stats().cache_bytes == 3 * held
    minilm.residency.cache.capacity = held // 2
    with pytest.raises(BundleError, match="more than adapter_cache_bytes"):
        minilm.load_adapter("e", bundles["e"])


def test_a_load_drops_built_forms_before_it_evicts_an_adapter(minilm: Engine) -> None:
    minilm.residency.cache.dense_budget = 0  # all factors: equal sizes
    bundles = {n: bundle_for(minilm, MINILM_TARGETS, seed=i) for i, n in enumerate("abc")}
    held, built = held_bytes(bundles["a"]), planned_bytes(bundles["a"])[1]
    minilm.residency.cache.capacity = 3 * held + 2 * built - 1  # three held, but not two built beside them
    for n in "ab":
        minilm.load_adapter(n, bundles[n])
        minilm.activate(n)  # built, and kept after the swap away
    minilm.activate(None)
    assert minilm.residency.cache.built_names() == ["a", "b"]
    before = minilm.stats()
    minilm.load_adapter("c", bundles["c"])
    assert [i.name for i in minilm.list_adapters()] == ["a", "b", "c"]  # nothing evicted
    assert minilm.residency.cache.built_names() == ["b"]  # a's built form, the least recent, gave way
    s = minilm.stats()
    assert s.cache_evictions == before.cache_evictions and s.cache_bytes == 3 * held + built


def test_replace_and_unload_active(minilm: Engine) -> None:
    base_w = weights_snapshot(minilm.model)
    minilm.load_adapter("x", bundle_for(minilm, MINILM_TARGETS, seed=1))
    minilm.activate("x")
    other = bundle_for(minilm, MINILM_TARGETS[:1], seed=2)
    minilm.load_adapter("y", other)
    minilm.activate("y")
    want = weights_snapshot(minilm.model)
    minilm.activate("x")
    minilm.load_adapter("x", other)  # replaces the active adapter: re-written at once
    assert minilm.stats().active_adapter == "x"
    assert same_weights(minilm.model, want)
    minilm.unload_adapter("x")
    assert minilm.stats().active_adapter is None and same_weights(minilm.model, base_w)
    minilm.unload_adapter("y")
    assert minilm.residency.bank.pristine_bytes() == 0, "pristine copies are kept only for targets in use"
    with pytest.raises(AdapterNotLoaded):
        minilm.unload_adapter("y")
