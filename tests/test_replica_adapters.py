"""serving/replica_adapters.py without Ray: the replica's adapter bookkeeping over a real
engine, a real registry folder and the real scheduler thread (the plain LRU stands in for
serve.multiplexed, with the same bound and the same close)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from adapters.bundle import Task, save_bundle
from adapters.manifest import AdapterManifest
from adapters.synthetic import random_bundle
from adapters.tasks.errors import ModelNotFound
from serving.config_sources import config_of
from serving.deployments import ModelServer
from serving.engine.engine import Engine
from tests.engine_utils import MINILM_ID, bundle_for, embed, engine_for

QV = ("attention.self.query", "attention.self.value")
MakeServer = Callable[..., ModelServer]
TEXTS = ["a short text", "another, somewhat longer text about adapters"]


@pytest.fixture(scope="module")
def engine(minilm_dir: Path) -> Engine:
    return engine_for(minilm_dir, MINILM_ID)


@pytest.fixture()
def make_server(engine: Engine, tmp_path: Path) -> Iterator[MakeServer]:
    """ModelServer(config_of(registry=<fresh folder>, **settings)) on the shared engine; every
    adapter the test left loaded is unloaded afterwards, so tests stay independent."""
    count = iter(range(1000))

    def make(**settings: object) -> ModelServer:
        return ModelServer(config_of(registry=str(tmp_path / f"reg{next(count)}"), **settings), engine=engine)

    yield make
    for info in engine.list_adapters():
        engine.unload_adapter(info.name)


def commit(server: ModelServer, engine: Engine, name: str, seed: int, tmp: Path) -> AdapterManifest:
    b = bundle_for(engine, QV, seed=seed, task=Task.FEATURE_EXTRACTION)
    path = save_bundle(b, tmp / f"{name}-{seed}.safetensors")
    return server.store.commit(name, path, b.metadata)


def run(coro):  # noqa: ANN001, ANN201 - a test helper
    return asyncio.run(coro)


def test_lru_bound_unloads_the_oldest_and_a_closed_lease_reloads(
    engine: Engine, make_server: MakeServer, tmp_path: Path
) -> None:
    server = make_server(max_adapters_per_replica=2)
    manifests = [commit(server, engine, f"lru{i}", i, tmp_path) for i in range(3)]

    async def main() -> tuple[list[str], torch.Tensor]:
        await server.adapters.prepare(manifests[0])
        first = await server.scheduler.call(lambda: embed(engine, TEXTS, manifests[0].ref).embeddings)
        for m in manifests[1:]:
            await server.adapters.prepare(m)
        held = await server.scheduler.call(engine.list_adapters)
        return [a.name for a in held], first

    held, first = run(main())
    assert held == [manifests[1].ref, manifests[2].ref]  # lru0's lease closed: unloaded from the engine
    # a request still queued for it reloads it from the remembered manifest: same answer
    ref = manifests[0].ref
    again = server.adapters.with_adapter([ref], lambda: embed(engine, TEXTS, ref)).embeddings
    assert engine.has_adapter(ref) and torch.equal(first, again)


def test_reload_after_engine_eviction_gives_the_same_answer(
    engine: Engine, make_server: MakeServer, tmp_path: Path
) -> None:
    server = make_server()
    m = commit(server, engine, "evicted", 7, tmp_path)
    run(server.adapters.prepare(m))
    before = embed(engine, TEXTS, m.ref).embeddings
    engine.unload_adapter(m.ref)  # as the engine's byte budget would
    after = server.adapters.with_adapter([m.ref], lambda: embed(engine, TEXTS, m.ref)).embeddings
    assert torch.equal(before, after)


def test_sweep_drops_deleted_versions_everywhere(engine: Engine, make_server: MakeServer, tmp_path: Path) -> None:
    server = make_server()
    v1 = commit(server, engine, "swept", 1, tmp_path)
    v2 = commit(server, engine, "swept", 2, tmp_path)

    async def main() -> list[str]:
        await server.adapters.prepare(v1)
        await server.adapters.prepare(v2)
        assert await server.sweep() == []  # both live: nothing dropped
        server.store.delete("swept", 1)
        dropped = await server.sweep()
        await server.scheduler.call(lambda: None)  # the unload ran on the worker thread
        return dropped

    assert run(main()) == [v1.ref]
    assert not engine.has_adapter(v1.ref) and engine.has_adapter(v2.ref)
    with pytest.raises(ModelNotFound):  # forgotten: not reloadable on demand
        server.adapters.reload(v1.ref)


def test_same_ref_with_other_bytes_never_serves_the_stale_copy(
    engine: Engine, make_server: MakeServer, tmp_path: Path
) -> None:
    """A registry rebuilt behind the replica's back: same name@version, other sha256."""
    server = make_server()
    old = commit(server, engine, "rebuilt", 1, tmp_path)
    run(server.adapters.prepare(old))
    stale = embed(engine, TEXTS, old.ref).embeddings
    other = bundle_for(engine, QV, seed=99, task=Task.FEATURE_EXTRACTION)
    server2 = make_server()
    new = server2.store.commit("rebuilt", save_bundle(other, tmp_path / "other.safetensors"), other.metadata)
    assert new.ref == old.ref and new.sha256 != old.sha256
    server.resolver = server2.resolver
    server.adapters.resolver = server2.resolver

    run(server.adapters.prepare(new))
    got = server.adapters.with_adapter([new.ref], lambda: embed(engine, TEXTS, new.ref)).embeddings
    assert not torch.allclose(got, stale, atol=1e-4)
    engine.unload_adapter(new.ref)
    engine.load_adapter("oracle", other)
    assert torch.equal(got, embed(engine, TEXTS, "oracle").embeddings)


def test_a_collected_lease_takes_no_lock_and_is_retired_at_the_next_request(
    engine: Engine, make_server: MakeServer, tmp_path: Path
) -> None:
    """The garbage collector may run a lease's __del__ inside any code, e.g. inside a
    ThreadPoolExecutor.submit that holds the executor module's global lock (this hung the
    suite once, in transformers' loader). __del__ must not wait on any lock; the adapter is
    unloaded at the replica's next request instead."""
    import concurrent.futures.thread as cf_thread
    import threading

    server = make_server()
    gone, other = commit(server, engine, "collected", 1, tmp_path), commit(server, engine, "next", 2, tmp_path)

    async def load(m: AdapterManifest) -> None:
        await server.adapters.prepare(m)
        await server.scheduler.call(lambda: None)

    async def main() -> None:
        await load(gone)
        lease = server.adapters._leases[gone.ref]
        with cf_thread._global_shutdown_lock:  # as inside another executor's submit
            t = threading.Thread(target=lease.__del__)
            t.start()
            t.join(timeout=5)
            assert not t.is_alive(), "AdapterLease.__del__ waited on a lock"
        assert list(server.adapters.evicted) == [gone.ref] and engine.has_adapter(gone.ref)
        await load(other)  # the next request retires what was collected

    run(main())
    assert not engine.has_adapter(gone.ref) and engine.has_adapter(other.ref)


def test_the_count_bound_is_the_byte_budget_over_the_smallest_adapter(minilm_dir: Path, make_server: MakeServer) -> None:
    """Without max_adapters_per_replica the multiplexer's bound is derived from bytes: the
    budget over what the smallest possible adapter (rank 1, one copy, on the smallest layer)
    really takes in an engine that keeps it in factor form, so the count never binds first."""
    server = make_server()
    factors_only = engine_for(minilm_dir, MINILM_ID, dense_budget_bytes=0)
    layer = min(factors_only.spec.linear_shapes, key=lambda n: sum(factors_only.spec.linear_shapes[n]))
    tiny = random_bundle(factors_only.spec, [layer], rank=1, num_copies=1, density=1.0, seed=0,
                         task=Task.FEATURE_EXTRACTION)
    smallest = factors_only.load_adapter("tiny", tiny).nbytes
    assert server.adapters.max_adapters == server.config.engine.adapter_cache_bytes // smallest
    assert server.adapters.max_adapters > 64  # the fixed bound it replaces


def test_a_round_robin_over_more_adapters_than_the_old_bound_loads_each_once(
    engine: Engine, make_server: MakeServer, tmp_path: Path
) -> None:
    """70 adapters (more than the old fixed bound of 64), twice round-robin: 70 loads, not 140."""
    server = make_server()
    one_layer = ("layer.0.attention.self.query",)
    manifests = []
    for i in range(70):
        b = bundle_for(engine, one_layer, seed=i, task=Task.FEATURE_EXTRACTION)
        manifests.append(server.store.commit(f"rr{i}", save_bundle(b, tmp_path / f"rr{i}.safetensors"), b.metadata))
    misses = engine.stats().cache_misses

    async def main() -> None:
        for _ in range(2):
            for m in manifests:
                await server.adapters.prepare(m)
        await server.scheduler.call(lambda: None)  # queued unloads (if any) have run

    run(main())
    assert engine.stats().cache_misses - misses == 70
    assert all(engine.has_adapter(m.ref) for m in manifests)
