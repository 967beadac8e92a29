"""AdapterCache alone (serving/engine/adapter_cache.py): byte accounting, the dense/factors
choice, LRU victims and what may never be evicted; fast, no Ray, no engine.

Entries are prepared from real bundles on a tiny two-Linear model, and every byte figure
is computed here from the shapes (float32), not read back from the cache.
"""

from __future__ import annotations

import pytest
import torch

from adapters.bundle import AdapterBundle, Task
from adapters.synthetic import random_bundle
from adapters.validation import BaseModelSpec
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


def entry(bank: WeightBank, name: str, mode: str, seed: int = 0) -> PreparedAdapter:
    return prepare(name, bundle(seed), bank, torch.device("cpu"), mode)  # type: ignore[arg-type]


def test_planned_and_held_bytes_follow_the_shapes(bank: WeightBank) -> None:
    assert planned_bytes(bundle(0)) == (DENSE, FACTORS, 0)
    dense, factors = entry(bank, "d", "dense"), entry(bank, "f", "factors")
    assert dense.nbytes == DENSE + FACTORS and dense.dense_nbytes == DENSE  # dense keeps its factors too
    assert factors.nbytes == FACTORS and factors.dense_nbytes == 0
    cache = AdapterCache(capacity=10**6, dense_budget=10**6)
    cache.put(dense)
    cache.put(factors)
    assert cache.nbytes == DENSE + 2 * FACTORS and cache.dense_nbytes == DENSE and len(cache) == 2


def test_mode_choice_respects_the_dense_budget_and_the_capacity(bank: WeightBank) -> None:
    cache = AdapterCache(capacity=DENSE + 3 * FACTORS, dense_budget=DENSE)
    assert cache.choose_mode(DENSE, FACTORS, 0, "x", set()) == "dense"
    cache.put(entry(bank, "x", "dense"))
    # the dense budget is spent: the next adapter is kept as factors
    assert cache.choose_mode(DENSE, FACTORS, 0, "y", set()) == "factors"
    # replacing x itself frees x's dense bytes first
    assert cache.choose_mode(DENSE, FACTORS, 0, "x", set()) == "dense"
    # x protected (active) and a capacity that leaves no room beside it: nothing fits
    tight = AdapterCache(capacity=DENSE + FACTORS + FACTORS - 4, dense_budget=10**9)
    tight.put(entry(bank, "x", "dense"))
    assert tight.choose_mode(DENSE, FACTORS, 0, "y", {"x"}) is None
    assert tight.choose_mode(DENSE, FACTORS, 0, "y", set()) == "dense"  # x may be evicted


def test_victims_are_least_recently_used_first_and_never_protected(bank: WeightBank) -> None:
    cache = AdapterCache(capacity=3 * FACTORS, dense_budget=0)
    for i, name in enumerate("abc"):
        cache.put(entry(bank, name, "factors", seed=i))
    assert cache.victims(0, "new", set()) == []
    assert cache.victims(FACTORS, "new", set()) == ["a"]
    cache.touch("a")  # a becomes most recent: b is now the oldest
    assert cache.victims(FACTORS, "new", set()) == ["b"]
    assert cache.victims(2 * FACTORS, "new", {"b"}) == ["c", "a"]  # b active: skipped
    cache.peek("c").inflight = 1  # leased by a request in progress
    assert cache.victims(FACTORS, "new", {"b"}) == ["a"]
    assert cache.victims(2 * FACTORS, "new", {"b"}) is None  # only a may go: not enough
    assert [e.name for e in cache.entries()] == ["b", "c", "a"]  # victims() evicts nothing
    # replacing an entry counts its bytes as free
    assert cache.victims(FACTORS, "a", {"b"}) == []


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
