"""The router's choice (serving.routing.affinity_ranks), driven with plain replica and load
data: affinity while the holder's load is within the bound, a spill to one more replica when
every holder is over it, first loads where the fewest adapters are, and no replica ever
left out. The rule is checked against the bound computed here by hand."""

from __future__ import annotations

import math

import pytest

from serving.routing import DEFAULT_LOAD_FACTOR, DEFAULT_MIN_LOAD, affinity_ranks, load_cap


def ranks(holders, fewest, rest, loads, min_load=DEFAULT_MIN_LOAD, load_factor=DEFAULT_LOAD_FACTOR):
    return affinity_ranks(holders, fewest, rest, loads.__getitem__, min_load, load_factor)


def test_load_cap_is_the_bounded_load_rule():
    # ceil(c * (total + 1) / n), never under min_load
    assert load_cap(10, 2, 2, 1.25) == math.ceil(1.25 * 11 / 2) == 7
    assert load_cap(0, 4, 2, 1.25) == 2
    assert load_cap(40, 4, 2, 1.0) == 11
    assert load_cap(5, 0, 2, 1.25) == 8  # no replica counted: as one


def test_a_holder_within_the_bound_keeps_its_adapter():
    loads = {"a": 3, "b": 2, "c": 1}
    # total 6 over 3 replicas: cap = ceil(1.25 * 7 / 3) = 3; a holds 3, 3 + 1 > 3: over; so give b the adapter
    assert ranks(["a", "b"], ["c"], [], loads) == [["b"], ["c"], ["a"]]
    loads = {"a": 2, "b": 2, "c": 0}
    # cap = ceil(1.25 * 5 / 3) = 3: both holders within, the less loaded first (a tie keeps the order)
    assert ranks(["a", "b"], ["c"], [], loads) == [["a", "b"], ["c"]]


def test_a_lightly_loaded_server_keeps_affinity_under_min_load():
    # the holder has 1 request and the others none: spreading would load the adapter twice for nothing
    assert ranks(["a"], ["b", "c"], [], {"a": 1, "b": 0, "c": 0}) == [["a"], ["b", "c"]]
    # with min_load 1 and no slack in the factor, the same loads spill
    assert ranks(["a"], ["b", "c"], [], {"a": 1, "b": 0, "c": 0}, min_load=1, load_factor=1.0) == [["b"], ["a"], ["c"]]


def test_every_holder_over_the_bound_spills_to_the_least_loaded_other_replica():
    loads = {"a": 9, "b": 8, "c": 3, "d": 1, "e": 2}
    # total 23 over 5: cap = ceil(1.25 * 24 / 5) = 6; a and b are over it
    assert load_cap(23, 5, DEFAULT_MIN_LOAD, DEFAULT_LOAD_FACTOR) == 6
    assert ranks(["a", "b"], ["c", "d"], ["e"], loads) == [["d"], ["b", "a"], ["e", "c"]]


def test_a_first_load_goes_where_the_fewest_adapters_are():
    loads = {"a": 5, "b": 1, "c": 0, "d": 4}
    assert ranks([], ["a", "b"], ["c", "d"], loads) == [["b", "a"], ["c", "d"]]
    assert ranks([], [], ["d", "c"], loads) == [["c", "d"]]


@pytest.mark.parametrize(
    "holders,fewest,rest,loads",
    [
        (["a"], ["b"], ["c"], {"a": 0, "b": 0, "c": 0}),
        (["a"], ["b"], ["c"], {"a": 50, "b": 0, "c": 1}),
        (["a", "b", "c"], [], [], {"a": 50, "b": 40, "c": 60}),
        ([], ["a"], ["b", "c"], {"a": 3, "b": 2, "c": 1}),
    ],
)
def test_every_replica_is_in_exactly_one_rank(holders, fewest, rest, loads):
    """A request is never stuck: if the first choice refuses, every other replica is still tried."""
    out = ranks(holders, fewest, rest, loads)
    flat = [r for rank in out for r in rank]
    assert sorted(flat) == sorted([*holders, *fewest, *rest]) and all(out)
