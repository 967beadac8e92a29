"""Concurrency: embed calls on different adapters from several threads at once each equal
their single-threaded reference, i.e. no forward ever overlapped a swap."""

from __future__ import annotations

import threading

import torch

from tests.engine_utils import MINILM_ID, bundle_for, embed, engine_for

TEXTS = ["threads must never see another adapter's weights", "short", "a third text, of medium length"]


def test_concurrent_embeds_on_different_adapters(minilm_dir) -> None:
    engine = engine_for(minilm_dir, MINILM_ID, dense_budget_bytes=8 * 1024 * 1024)
    names: list[str | None] = [None]
    for i in range(3):
        engine.load_adapter(f"a{i}", bundle_for(engine, ("attention.self.query", "attention.output.dense"), seed=i))
        engine.residency.cache.dense_budget = 0  # a0 is built dense, a1 and a2 as factors
        names.append(f"a{i}")
    engine.residency.cache.dense_budget = 8 * 1024 * 1024
    assert {i.mode for i in engine.list_adapters()} == {"dense", "factors"}
    refs = {n: embed(engine, TEXTS, n).embeddings for n in names}
    assert all((refs[n] - refs[None]).abs().max() > 1e-3 for n in names[1:])

    errors: list[str] = []
    start = threading.Barrier(len(names) * 2)

    def worker(name: str | None) -> None:
        start.wait()
        for _ in range(6):
            got = embed(engine, TEXTS, name).embeddings
            if not torch.allclose(got, refs[name], atol=1e-6, rtol=0):
                errors.append(f"{name}: max diff {(got - refs[name]).abs().max():.3g}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in names * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    s = engine.stats()
    assert s.swaps > len(names) and s.cache_hits >= 6 * 2 * 3


def test_mixed_and_merged_forwards_side_by_side_equal_their_references(minilm_dir) -> None:
    """Engine workers run forwards concurrently: mixed rows (hooks on the pristine weights),
    base rows and merged rows of one adapter from many threads each equal their reference."""
    engine = engine_for(minilm_dir, MINILM_ID)
    for i in range(2):
        engine.load_adapter(f"m{i}", bundle_for(engine, ("attention.self.query", "output.dense"), seed=10 + i))
    names: list[str | None] = [None, "m0", "m1"]
    refs = {n: embed(engine, TEXTS, n).embeddings for n in names}
    mixed_adapters = ["m0", None, "m1"]
    mixed_ref = torch.stack([refs[a][i] for i, a in enumerate(mixed_adapters)])

    def mixed() -> torch.Tensor:
        rows = engine.encode(TEXTS, mixed_adapters, ["embed"] * 3, mixed=True)
        return torch.stack([r.embedding for r in rows])

    jobs = [("mixed", mixed, mixed_ref)] + [(n, (lambda n=n: embed(engine, TEXTS, n).embeddings), refs[n]) for n in names]
    errors: list[str] = []
    start = threading.Barrier(len(jobs) * 2)

    def worker(label, fn, ref) -> None:
        start.wait()
        for _ in range(5):
            got = fn()
            if not torch.allclose(got, ref, atol=1e-5, rtol=0):
                errors.append(f"{label}: max diff {(got - ref).abs().max():.3g}")

    threads = [threading.Thread(target=worker, args=job) for job in jobs * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_the_gate_lets_same_state_forwards_overlap_and_makes_a_swap_wait(minilm_dir) -> None:
    engine = engine_for(minilm_dir, MINILM_ID)
    engine.load_adapter("g", bundle_for(engine, ("attention.self.query",), seed=7))
    res = engine.residency
    (entry,) = [res.cache.peek("g")]
    both_inside = threading.Barrier(2, timeout=10)

    def same_state() -> None:
        with res.merged(entry):
            both_inside.wait()  # times out (BrokenBarrierError) if the gate serialised them

    threads = [threading.Thread(target=same_state) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not both_inside.broken

    # a forward on the adapter holds the weights; a base forward waits until it ends
    inside, release, order = threading.Event(), threading.Event(), []

    def adapter_forward() -> None:
        with res.merged(entry):
            inside.set()
            release.wait(10)
            order.append("adapter done")

    def base_forward() -> None:
        inside.wait(10)
        with res.merged(None):
            order.append("base ran")
            assert res.stats().active_adapter is None

    a, b = threading.Thread(target=adapter_forward), threading.Thread(target=base_forward)
    a.start()
    b.start()
    inside.wait(10)
    b.join(0.3)
    assert b.is_alive() and order == []  # the base forward is held at the gate
    release.set()
    a.join()
    b.join()
    assert order == ["adapter done", "base ran"]
