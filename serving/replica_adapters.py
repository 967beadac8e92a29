"""The adapters one model replica holds, by multiplexed model id (`name@version`).

A decision: Ray Serve's `serve.multiplexed` stays the owner of "which adapters
this replica holds", used only as documented. Serve routes a model id to the replicas
that report it loaded and evicts its least recently used model beyond
`max_adapters_per_replica`, calling the evicted object's `__del__`: the object it caches
here is an `AdapterLease`, whose close unloads the adapter from the engine. capaserve
never reaches into the multiplexer; the two things Serve has no public call for are
handled on this side:

- a version deleted from the registry (or the same ref with other bytes) is unloaded from
  the engine and its manifest forgotten, while Serve keeps its lease until the LRU drops
  it. Harmless: the ingress answers 404 for a deleted version before routing, and a
  replaced one is reloaded from its new manifest on first use (`admit`).
- the engine may evict an adapter under its byte budget while the multiplexer still holds
  its lease; the next request for it reloads it (`admit`), and a request whose batch found
  it evicted is admitted again, once (the deployment).

Outside Ray (tests and benchmarks of the shim) a plain LRU of leases stands in for
`serve.multiplexed`, with the same bound and the same close.

Registry reads and engine loads and unloads run on this object's own loader thread, never
on an engine worker nor on the event loop: a cold adapter is fetched, validated and
packed there while batches of other adapters keep running, and its requests wait for
the future `admit` returns (the scheduler takes it as their readiness). This object knows
nothing of the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from adapters.manifest import AdapterManifest, parse_model_ref
from adapters.registry.resolver import AdapterResolver
from adapters.registry.store import RegistryStore
from serving.engine.engine import Engine
from adapters.tasks.errors import AdapterNotLoaded, ModelNotFound

log = logging.getLogger("capaserve.replica")

#: Manifests a replica remembers to reload evicted adapters without a registry lookup.
MAX_REMEMBERED_MANIFESTS = 4096


class AdapterLease:
    """What the multiplexer caches per adapter: closing it unloads the adapter from the engine.

    `serve.multiplexed` calls a cached object's `__del__` when it evicts it (its documented
    unload hook), and Python's garbage collector calls it too, at any allocation in any
    thread, possibly while that code holds a lock (seen: inside a ThreadPoolExecutor's
    submit, whose lock the scheduler's own submit then waited on for ever). So `__del__`
    only queues the ref (a deque append takes no lock); the owner retires queued refs at
    its next safe point. `close` (the local LRU, safe callers) retires at once. Both act once.
    """

    def __init__(self, owner: "ReplicaAdapters", ref: str) -> None:
        self.owner = owner
        self.ref = ref
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner.retire(self.ref)

    def __del__(self) -> None:
        if hasattr(self, "closed") and not self.closed:  # a half-built lease has nothing to release
            self.closed = True
            self.owner.evicted.append(self.ref)


class ReplicaAdapters:
    """Loads, keeps, reloads and drops the adapters of one replica's engine."""

    def __init__(
        self,
        engine: Engine,
        store: RegistryStore,
        resolver: AdapterResolver,
        max_adapters: int,
        in_ray: bool,
        on_change: Callable[[], None],
    ) -> None:
        self.engine = engine
        self.store = store
        self.resolver = resolver
        self.max_adapters = max_adapters
        self._on_change = on_change  # engine state changed (loader thread): refresh stats
        self._manifests: OrderedDict[str, AdapterManifest] = OrderedDict()
        self._leases: dict[str, AdapterLease] = {}
        #: refs whose lease Serve evicted (or the GC collected): retired at the next safe point
        self.evicted: deque[str] = deque()
        #: one thread, so a ref's loads and unloads run in the order they were asked
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capaserve-loader")
        #: refs being made resident now: their requests share one task
        self._loading: dict[str, asyncio.Task[None]] = {}
        #: requests admitted and not yet answered, per ref: their adapter is not unloaded meanwhile
        self._inflight: dict[str, int] = {}
        #: refs whose lease closed while requests for them were in flight: unloaded after the last
        self._unload_later: set[str] = set()
        #: bundles fetched from the registry and loaded into the engine so far
        self.fetches = 0
        if in_ray:
            # a plain function, not the bound method: Serve keeps its multiplexer as an
            # attribute of the decorated callable, which a bound method cannot take
            async def load(ref: str) -> AdapterLease:
                return await self._load(ref)

            self._get = serve.multiplexed(max_num_models_per_replica=max_adapters)(load)
        else:
            self._get = self._get_local

    async def admit(self, manifest: AdapterManifest) -> asyncio.Future[None] | None:
        """Start making the request's adapter resident here (through the multiplexer).

        None when it already is (the multiplexer has seen the use); otherwise a future done
        once it is, which a request waits on in the scheduler instead of holding a worker.
        The caller holds the adapter until `release(ref)`: a lease the multiplexer closes
        meanwhile unloads it only after the last admitted request is answered.
        """
        ref = manifest.ref
        self._inflight[ref] = self._inflight.get(ref, 0) + 1
        try:
            return await self._admit(manifest)
        except BaseException:
            self.release(ref)
            raise

    async def _admit(self, manifest: AdapterManifest) -> asyncio.Future[None] | None:
        ref = manifest.ref
        known = self._manifests.get(ref)
        if known is not None and known.sha256 != manifest.sha256:
            await self.drop(ref)  # same ref, other bytes: a stale copy must not serve
        self._remember(manifest)
        self.retire_evicted()
        lease = self._leases.get(ref)
        if lease is not None and not lease.closed and ref not in self._loading and self.engine.has_adapter(ref):
            await self._get(ref)  # the cached lease at once; Serve's LRU sees the use
            self.retire_evicted()  # Serve may have evicted another adapter
            return None
        return self.ready(ref)

    def release(self, ref: str) -> None:
        """A request admitted for `ref` is answered (event loop)."""
        left = self._inflight.get(ref, 0) - 1
        if left > 0:
            self._inflight[ref] = left
            return
        self._inflight.pop(ref, None)
        if ref in self._unload_later:
            self._unload_later.discard(ref)
            self.retire(ref)

    async def prepare(self, manifest: AdapterManifest) -> str:
        """`admit` and wait until the adapter is resident; its engine name."""
        try:
            ready = await self.admit(manifest)
            if ready is not None:
                await ready
        finally:
            self.release(manifest.ref)
        return manifest.ref

    def ready(self, ref: str) -> asyncio.Future[None]:
        """A future done when `ref` is resident in the engine (one load however many ask)."""
        task = self._loading.get(ref)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._make_resident(ref))
            self._loading[ref] = task
            task.add_done_callback(lambda t: self._loading.pop(ref) if self._loading.get(ref) is t else None)
        return task

    async def _make_resident(self, ref: str) -> None:
        lease = await self._get(ref)  # loads through `_load` unless the multiplexer holds it
        self.retire_evicted()
        if lease.closed or not self.engine.has_adapter(ref):
            # the engine evicted it under its byte budget, or Serve dropped the lease since
            manifest = await self._manifest(ref)
            await self._on_loader(self._fetch_and_load, ref, manifest)

    def _remember(self, manifest: AdapterManifest) -> None:
        self._manifests[manifest.ref] = manifest
        self._manifests.move_to_end(manifest.ref)
        while len(self._manifests) > MAX_REMEMBERED_MANIFESTS:
            self._manifests.popitem(last=False)

    async def _manifest(self, ref: str) -> AdapterManifest:
        manifest = self._manifests.get(ref)
        if manifest is None:
            if parse_model_ref(ref)[1] is None:
                raise ModelNotFound(f"multiplexed model id {ref!r} must be name@version")
            manifest = await self._on_loader(self.resolver.resolve, ref)
            self._remember(manifest)
        return manifest

    async def _on_loader(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    async def _load(self, ref: str) -> AdapterLease:
        """The multiplexed loader: fetch, validate and load the bundle on the loader thread."""
        manifest = await self._manifest(ref)
        await self._on_loader(self._fetch_and_load, ref, manifest)
        lease = AdapterLease(self, ref)
        self._leases[ref] = lease
        return lease

    async def _get_local(self, ref: str) -> AdapterLease:
        """Outside Ray: the same loader with a plain LRU in place of serve.multiplexed."""
        lease = self._leases.get(ref)
        if lease is not None and not lease.closed:
            return lease
        lease = await self._load(ref)
        live = [r for r, lz in self._leases.items() if not lz.closed]
        while len(live) > self.max_adapters:
            self._leases.pop(live.pop(0)).close()
        return lease

    def retire_evicted(self) -> None:
        """Retire every ref `AdapterLease.__del__` queued (called where no lock is held)."""
        while self.evicted:
            self.retire(self.evicted.popleft())

    def retire(self, ref: str) -> None:
        """Unload `ref` from the engine on the loader thread (asked from any thread)."""
        if self._leases.get(ref) is not None and self._leases[ref].closed:
            self._leases.pop(ref, None)
        try:
            self._loader.submit(self._engine_unload, ref)
        except RuntimeError:  # shut down
            pass

    async def drop(self, ref: str) -> None:
        """Forget `ref`'s bytes here, manifest and engine copy (a deleted or replaced version)."""
        self._manifests.pop(ref, None)
        await self._on_loader(self._engine_unload, ref, True)

    async def settled(self) -> None:
        """Wait until every load and unload asked so far has run (tests, shutdown)."""
        await self._on_loader(lambda: None)

    def shutdown(self) -> None:
        """Stop the loader thread (queued loads and unloads are dropped)."""
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ loader thread

    def _fetch_and_load(self, ref: str, manifest: AdapterManifest) -> None:
        """Registry read, validation and pre-merge: the whole cost of a cold adapter, here."""
        bundle = self.resolver.fetch_bundle(manifest)
        self.engine.load_adapter(ref, bundle)
        self.fetches += 1
        self._on_change()

    def _engine_unload(self, ref: str, forget: bool = False) -> None:
        """Unload `ref` unless it was loaded again since this was queued, or (unless `forget`:
        a deleted or replaced version) requests admitted for it are in flight: then after the
        last one. A forward still using it keeps it until it ends (the engine's lease)."""
        lease = self._leases.get(ref)
        if lease is not None and not lease.closed and ref in self._manifests:
            return
        if not forget and self._inflight.get(ref):
            self._unload_later.add(ref)  # read back by `release` on the event loop
            return
        try:
            self.engine.unload_adapter(ref)
        except AdapterNotLoaded:
            pass
        self._on_change()

    # ------------------------------------------------------------------ deletion sweep

    async def sweep(self) -> list[str]:
        """Drop every held adapter version the registry no longer has; returns the refs dropped.

        Also retires leases evicted since the last request (this runs every poll period)."""
        self.retire_evicted()
        by_name: dict[str, list[str]] = {}
        for ref in list(self._manifests):
            by_name.setdefault(parse_model_ref(ref)[0], []).append(ref)
        # one thread hop for every name (one per name cost thousands of hops a second with
        # thousands of adapters held)
        live_of = await asyncio.to_thread(lambda: {n: set(self.store.version_numbers(n)) for n in by_name})
        dropped: list[str] = []
        for name, refs in by_name.items():
            gone = [r for r in refs if parse_model_ref(r)[1] not in live_of[name]]
            for ref in gone:
                await self.drop(ref)
                dropped.append(ref)
            if gone:
                self.resolver.forget(name)
        if dropped:
            log.info("dropped deleted adapters %s", dropped)
        return dropped

