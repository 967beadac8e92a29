"""serving/replica_adapters.py without Ray: the replica's adapter bookkeeping over a real
engine, a real registry folder, the real loader thread and the real scheduler (the plain
LRU stands in for serve.multiplexed, with the same bound and the same close)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from adapters.bundle import Task, save_bundle
from adapters.manifest import AdapterManifest
from adapters.registry.local import LocalStore
from adapters.registry.store import AdapterNotFound
from adapters.synthetic import random_bundle
from serving.config_sources import config_of
from serving.deployments import ModelServer
from serving.engine.engine import Engine
from adapters.tasks.errors import Overloaded
from serving.replica_io import ReplicaCall
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


async def served(server: ModelServer, m: AdapterManifest) -> torch.Tensor:
    """The deployment's answer for TEXTS with `m` (admission, scheduler, runner, engine)."""
    result = await server.embed(ReplicaCall(adapter=m, texts=TEXTS))
    return torch.tensor([list(o) for o in result.outputs])


def test_lru_bound_unloads_the_oldest_and_a_closed_lease_reloads(
    engine: Engine, make_server: MakeServer, tmp_path: Path
) -> None:
    server = make_server(max_adapters_per_replica=2)
    manifests = [commit(server, engine, f"lru{i}", i, tmp_path) for i in range(3)]

    async def main() -> tuple[list[str], torch.Tensor, torch.Tensor]:
        first = await served(server, manifests[0])
        for m in manifests[1:]:
            await server.adapters.prepare(m)
        await server.adapters.settled()
        held = [a.name for a in engine.list_adapters()]
        # the next request for it reloads it from the remembered manifest: same answer
        return held, first, await served(server, manifests[0])

    held, first, again = run(main())
    assert held == [manifests[1].ref, manifests[2].ref]  # lru0's lease closed: unloaded from the engine
    assert engine.has_adapter(manifests[0].ref) and torch.equal(first, again)


def test_reload_after_engine_eviction_gives_the_same_answer(
    engine: Engine, make_server: MakeServer, tmp_path: Path
) -> None:
    server = make_server()
    m = commit(server, engine, "evicted", 7, tmp_path)

    async def main() -> tuple[torch.Tensor, torch.Tensor, int]:
        before = await served(server, m)
        engine.unload_adapter(m.ref)  # as the engine's byte budget would, with the lease still held
        fetches = server.adapters.fetches
        return before, await served(server, m), fetches

    before, after, fetches = run(main())
    assert torch.equal(before, after) and server.adapters.fetches == fetches + 1
    assert torch.equal(after, embed(engine, TEXTS, m.ref).embeddings)


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
        await server.adapters.settled()  # the unload ran on the loader thread
        assert not engine.has_adapter(v1.ref) and engine.has_adapter(v2.ref)
        with pytest.raises(AdapterNotFound):  # forgotten here and gone from the registry
            await server.adapters.ready(v1.ref)
        return dropped

    assert run(main()) == [v1.ref]


def test_same_ref_with_other_bytes_never_serves_the_stale_copy(
    engine: Engine, make_server: MakeServer, tmp_path: Path
) -> None:
    """A registry rebuilt behind the replica's back: same name@version, other sha256."""
    server = make_server()
    old = commit(server, engine, "rebuilt", 1, tmp_path)
    stale = run(served(server, old))
    other = bundle_for(engine, QV, seed=99, task=Task.FEATURE_EXTRACTION)
    server2 = make_server()
    new = server2.store.commit("rebuilt", save_bundle(other, tmp_path / "other.safetensors"), other.metadata)
    assert new.ref == old.ref and new.sha256 != old.sha256
    server.resolver = server2.resolver
    server.adapters.resolver = server2.resolver

    got = run(served(server, new))
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
        await server.adapters.settled()

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
    budget over what the smallest possible adapter (rank 1, one copy, float16 factors, on the
    smallest layer) really takes held compact in the engine, so the count never binds first;
    with the default budget it allows far more than thousands."""
    server = make_server()
    factors_only = engine_for(minilm_dir, MINILM_ID, dense_budget_bytes=0)
    layer = min(factors_only.spec.linear_shapes, key=lambda n: sum(factors_only.spec.linear_shapes[n]))
    tiny = random_bundle(factors_only.spec, [layer], rank=1, num_copies=1, density=1.0, seed=0,
                         task=Task.FEATURE_EXTRACTION, dtype=torch.float16)
    smallest = factors_only.load_adapter("tiny", tiny).nbytes
    assert server.adapters.max_adapters == server.config.engine.adapter_cache_bytes // smallest
    assert server.adapters.max_adapters > 100_000  # far beyond thousands (the old fixed bound was 64)


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
        await server.adapters.settled()  # queued unloads (if any) have run

    run(main())
    assert engine.stats().cache_misses - misses == 70
    assert all(engine.has_adapter(m.ref) for m in manifests)


class GatedStore(LocalStore):
    """The registry folder as it is, except that reading `held`'s blob waits for `gate`: a
    slow registry read, observed by the thread it runs on."""

    def __init__(self, root: Path, held: str) -> None:
        super().__init__(root)
        self.held = held
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.threads: list[str] = []

    def _open_blob(self, sha256: str):  # noqa: ANN202 - the base's iterator
        self.threads.append(threading.current_thread().name)
        if sha256 == self.held:
            self.entered.set()
            assert self.gate.wait(60), "the test never opened the gate"
        return super()._open_blob(sha256)


def test_a_cold_adapters_slow_fetch_does_not_stall_other_adapters(
    engine: Engine, make_server: MakeServer, tmp_path: Path
) -> None:
    """While a cold adapter's blob read is held, a resident adapter's requests are all
    answered; the cold one's requests wait in the replica's queue, bounded by max_queue (503
    beyond it), and then run with the right answer. The read runs on the loader thread."""
    server = make_server(max_queue=3)
    hot, cold = commit(server, engine, "hot", 1, tmp_path), commit(server, engine, "cold", 2, tmp_path)
    store = GatedStore(server.store.root, held=cold.sha256)
    server.resolver.store = store

    async def main() -> tuple[torch.Tensor, torch.Tensor]:
        hot_before = await served(server, hot)
        cold_calls = [asyncio.create_task(served(server, cold)) for _ in range(2)]
        assert await asyncio.to_thread(store.entered.wait, 60)
        hot_now = [await served(server, hot) for _ in range(6)]  # one at a time: each waits on the gate if any does
        assert not any(t.done() for t in cold_calls) and not store.gate.is_set()
        assert server.scheduler.stats().queue_depth == 2  # the cold requests wait, counted
        crowd = [asyncio.create_task(served(server, hot)) for _ in range(2)]
        await asyncio.sleep(0)
        outcomes = await asyncio.gather(*crowd, return_exceptions=True)
        assert sum(isinstance(o, Overloaded) for o in outcomes) == 1  # 2 waiting + 1 queued = max_queue
        assert all(torch.equal(h, hot_before) for h in hot_now)
        store.gate.set()
        got = await asyncio.gather(*cold_calls)
        assert torch.equal(got[0], got[1])
        return hot_before, got[0]

    hot_out, cold_out = run(main())
    # the two cold requests ran as one batch: other matmul shapes than one request alone, so
    # float32 rounding may differ in the last bit (batch size is not part of the answer)
    torch.testing.assert_close(cold_out, embed(engine, TEXTS, cold.ref).embeddings, atol=1e-6, rtol=0)
    assert not torch.allclose(cold_out, hot_out, atol=1e-4)
    assert store.threads and all(t.startswith("capaserve-loader") for t in store.threads)
