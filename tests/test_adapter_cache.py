"""AdapterCache alone (serving/engine/adapter_cache.py): compact holding (factors plus
packed mask bits), byte accounting of what is held and built, the dense/factors choice,
the LRU of built forms, LRU victims and what may never be evicted; fast, no Ray, no engine.

Entries are prepared from real bundles on a tiny two-Linear model, and every byte figure
is computed here from the shapes (float32 factors, 8 mask elements a byte), not read back
from the cache.
"""

from __future__ import annotations

import pytest
import torch

from adapters.bundle import AdapterBundle, Task
from adapters.synthetic import random_bundle
from adapters.validation import BaseModelSpec
from adapters.merge import delta_weight, stacked_factors
from serving.engine.adapter_cache import AdapterCache, PreparedAdapter, planned_bytes, prepare
from serving.engine.weights import WeightBank

SHAPES = {"a": (16, 8), "b": (24, 16)}  # name -> (out, in)
R, D = 2, 2


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 24)


@pytest.fixture()
def bank() -> WeightBank:
    torch.manual_seed(0)
    return WeightBank(Tiny())


def bundle(seed: int) -> AdapterBundle:
    spec = BaseModelSpec.from_model("tiny", Task.FEATURE_EXTRACTION, Tiny(), 16)
    return random_bundle(spec, list(SHAPES), rank=R, num_copies=D, seed=seed, task=Task.FEATURE_EXTRACTION)


DENSE = sum(o * i * 4 for o, i in SHAPES.values())  # 16*8 + 24*16 floats
FACTORS = sum((o + i) * D * R * 4 for o, i in SHAPES.values())
#: held compact: A [r, in] and B [out, r] in float32, masks [d, r, in] and [d, out, r] as bits
HELD = sum((o + i) * R * 4 + (D * R * i + 7) // 8 + (D * o * R + 7) // 8 for o, i in SHAPES.values())


def entry(bank: WeightBank, name: str, mode: str, seed: int = 0) -> PreparedAdapter:
    return prepare(name, bundle(seed), bank, torch.device("cpu"), mode)  # type: ignore[arg-type]


def test_planned_and_held_bytes_follow_the_shapes(bank: WeightBank) -> None:
    assert planned_bytes(bundle(0)) == (DENSE, FACTORS, 0)
    dense, factors = entry(bank, "d", "dense"), entry(bank, "f", "factors")
    assert dense.nbytes == factors.nbytes == HELD and dense.built is None  # nothing built at load
    cache = AdapterCache(capacity=10**6, dense_budget=10**6)
    cache.put(dense)
    cache.put(factors)
    assert cache.nbytes == 2 * HELD and cache.dense_nbytes == 0 and len(cache) == 2
    cache.build(dense)  # for a mixed forward: the factor pair only
    assert dense.nbytes == HELD + FACTORS and cache.dense_nbytes == 0
    cache.build(dense, merged=True)  # merged: the dense delta too, beside its factors (the mixed path hooks them)
    assert dense.nbytes == HELD + DENSE + FACTORS and cache.dense_nbytes == DENSE
    cache.build(factors)
    assert cache.nbytes == 2 * HELD + DENSE + 2 * FACTORS
    cache.pop("d")
    assert cache.nbytes == HELD + FACTORS and dense.built is None and cache.built_names() == ["f"]


def test_built_forms_equal_the_merge_of_the_bundle_and_rebuild_bit_identically(bank: WeightBank) -> None:
    b = bundle(4)
    e = prepare("x", b, bank, torch.device("cpu"), "dense")
    cache = AdapterCache(capacity=10**6, dense_budget=10**6)
    cache.put(e)
    first = cache.build(e, merged=True)
    for t, f in b.targets.items():
        pair = stacked_factors(f, b.metadata.scaling)
        assert torch.equal(first.factors[t].b, pair[0]) and torch.equal(first.factors[t].a, pair[1])
        assert torch.equal(first.deltas[t].dense, delta_weight(f, b.metadata.scaling))
    e.built = None  # dropped, as the LRU of built forms does
    again = cache.build(e, merged=True)
    assert again is not first and all(torch.equal(again.deltas[t].dense, first.deltas[t].dense) for t in SHAPES)


class Same(torch.nn.Module):
    """Three targets of one shape and one of another: build_pairs builds a shape's targets together."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.q, self.v = (torch.nn.Linear(8, 16) for _ in range(3))
        self.o = torch.nn.Linear(16, 8)


def test_targets_of_one_shape_built_together_equal_the_per_target_merge_bit_for_bit() -> None:
    spec = BaseModelSpec.from_model("same", Task.FEATURE_EXTRACTION, Same(), 16)
    b = random_bundle(spec, ["p", "q", "v", "o"], rank=3, num_copies=3, seed=7, task=Task.FEATURE_EXTRACTION)
    e = prepare("s", b, WeightBank(Same()), torch.device("cpu"), "factors")
    built = e.build()
    for t, f in b.targets.items():
        want_b, want_a = stacked_factors(f, b.metadata.scaling)
        got = built.factors[t]
        assert got.b.shape == want_b.shape and got.a.shape == want_a.shape
        assert torch.equal(got.b, want_b) and torch.equal(got.a, want_a), t
        assert got.b.is_contiguous() and got.a.is_contiguous()


def test_built_forms_are_kept_while_they_fit_and_give_way_least_recent_first(bank: WeightBank) -> None:
    cache = AdapterCache(capacity=3 * HELD + 3 * FACTORS, dense_budget=2 * DENSE + 1)
    es = {n: entry(bank, n, "factors", seed=i) for i, n in enumerate("abc")}
    for e in es.values():
        cache.put(e)
        cache.build(e)
    assert cache.built_names() == ["a", "b", "c"] and cache.nbytes == 3 * HELD + 3 * FACTORS  # all fit: all kept
    cache.shed_built(FACTORS)  # room for one more built form: the least recently built gives way
    assert cache.built_names() == ["b", "c"] and es["a"].built is None and cache.nbytes == 3 * HELD + 2 * FACTORS
    cache.capacity = 3 * HELD + FACTORS  # only one fits now: the one just built stays
    cache.build(es["a"])
    assert cache.built_names() == ["a"] and cache.nbytes == 3 * HELD + FACTORS


def test_dense_deltas_stay_within_their_budget_and_bytes_are_counted_as_they_change(bank: WeightBank) -> None:
    cache = AdapterCache(capacity=10**6, dense_budget=2 * DENSE)
    es = {n: entry(bank, n, "dense", seed=i) for i, n in enumerate("abc")}
    for e in es.values():
        cache.put(e)
        cache.build(e)  # pairs only (a mixed forward)
    assert cache.nbytes == 3 * (HELD + FACTORS) and cache.dense_nbytes == 0
    for n in "abc":
        cache.build(es[n], merged=True)  # a merge adds the dense deltas: a's give way to c's
    assert cache.built_names() == ["b", "c"] and cache.dense_nbytes == 2 * DENSE
    assert cache.nbytes == 3 * HELD + 2 * (FACTORS + DENSE)
    cache.pop("c")
    assert cache.nbytes == 2 * HELD + FACTORS + DENSE and cache.dense_nbytes == DENSE

def test_mode_choice_respects_the_dense_budget_and_the_capacity(bank: WeightBank) -> None:
    cache = AdapterCache(capacity=2 * HELD + DENSE + FACTORS, dense_budget=DENSE)
    assert cache.choose_mode(DENSE, FACTORS, HELD, "x", set()) == "dense"
    cache.put(entry(bank, "x", "dense"))
    # built forms share the dense budget through their LRU: the next adapter may be dense too
    assert cache.choose_mode(DENSE, FACTORS, HELD, "y", set()) == "dense"
    # a dense budget smaller than one adapter's deltas: factors
    assert AdapterCache(capacity=10**6, dense_budget=DENSE - 4).choose_mode(DENSE, FACTORS, HELD, "y", set()) == "factors"
    # x protected (active) and a capacity that leaves room beside it for y's factors only, then for nothing
    assert cache.choose_mode(DENSE, FACTORS, HELD, "y", {"x"}) == "dense"
    cache.capacity = 2 * HELD + FACTORS
    assert cache.choose_mode(DENSE, FACTORS, HELD, "y", {"x"}) == "factors"
    cache.capacity = 2 * HELD + FACTORS - 4
    assert cache.choose_mode(DENSE, FACTORS, HELD, "y", {"x"}) is None
    assert cache.choose_mode(DENSE, FACTORS, HELD, "y", set()) == "factors"  # x may be evicted


def test_victims_are_least_recently_used_first_and_never_protected(bank: WeightBank) -> None:
    cache = AdapterCache(capacity=3 * HELD, dense_budget=0)
    for i, name in enumerate("abc"):
        cache.put(entry(bank, name, "factors", seed=i))
    assert cache.victims(0, "new", set()) == []
    assert cache.victims(HELD, "new", set()) == ["a"]
    cache.touch("a")  # a becomes most recent: b is now the oldest
    assert cache.victims(HELD, "new", set()) == ["b"]
    assert cache.victims(2 * HELD, "new", {"b"}) == ["c", "a"]  # b active: skipped
    cache.peek("c").inflight = 1  # leased by a request in progress
    assert cache.victims(HELD, "new", {"b"}) == ["a"]
    assert cache.victims(2 * HELD, "new", {"b"}) is None  # only a may go: not enough
    assert [e.name for e in cache.entries()] == ["b", "c", "a"]  # victims() evicts nothing
    # replacing an entry counts its bytes as free
    assert cache.victims(HELD, "a", {"b"}) == []


def test_put_replaces_and_peek_does_not_reorder(bank: WeightBank) -> None:
    cache = AdapterCache(capacity=10**6, dense_budget=0)
    first = entry(bank, "a", "factors", seed=1)
    assert cache.put(first) is None
    cache.put(entry(bank, "b", "factors", seed=2))
    cache.peek("a")
    assert list(cache.names()) == ["a", "b"]
    second = entry(bank, "a", "factors", seed=3)
    assert cache.put(second) is first and cache.peek("a") is second
    assert list(cache.names()) == ["b", "a"]  # a replaced entry is the most recent
    assert cache.pop("a") is second and "a" not in cache and cache.pop("a") is None
