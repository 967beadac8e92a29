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
        names.append(f"a{i}")
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
