"""The adapters one model replica holds, by multiplexed model id (`name@version`).

A decision (issue 13): Ray Serve's `serve.multiplexed` stays the owner of "which adapters
this replica holds", used only as documented. Serve routes a model id to the replicas
that report it loaded and evicts its least recently used model beyond
`max_adapters_per_replica`, calling the evicted object's `__del__`: the object it caches
here is an `AdapterLease`, whose close unloads the adapter from the engine. capaserve
never reaches into the multiplexer; the two things Serve has no public call for are
handled on this side:

- a version deleted from the registry (or the same ref with other bytes) is unloaded from
  the engine and its manifest forgotten, while Serve keeps its lease until the LRU drops
  it. Harmless: the ingress answers 404 for a deleted version before routing, and a
  replaced one is reloaded from its new manifest on first use (`with_adapter`).
- the engine may evict an adapter under its byte budget while the multiplexer still holds
  its lease; the next request for it reloads it (`with_adapter`).

Outside Ray (tests and benchmarks of the shim) a plain LRU of leases stands in for
`serve.multiplexed`, with the same bound and the same close.

Engine loads and unloads run on the scheduler's worker thread, between batches.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TypeVar

from ray import serve

from adapters.bundle import AdapterBundle
from adapters.manifest import AdapterManifest, parse_model_ref
from adapters.registry.resolver import AdapterResolver
from adapters.registry.store import RegistryStore
from serving.engine.engine import Engine
from adapters.tasks.errors import AdapterNotLoaded, ModelNotFound
from serving.scheduler import Scheduler

log = logging.getLogger("capaserve.replica")

#: Manifests a replica remembers to reload evicted adapters without a registry lookup.
MAX_REMEMBERED_MANIFESTS = 4096

T = TypeVar("T")


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
        scheduler: Scheduler,
        store: RegistryStore,
        resolver: AdapterResolver,
        max_adapters: int,
        in_ray: bool,
        on_change: Callable[[], None],
    ) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.store = store
        self.resolver = resolver
        self.max_adapters = max_adapters
        self._on_change = on_change  # engine state changed (worker thread): refresh stats
        self._manifests: OrderedDict[str, AdapterManifest] = OrderedDict()
        self._leases: dict[str, AdapterLease] = {}
        #: refs whose lease Serve evicted (or the GC collected): retired at the next safe point
        self.evicted: deque[str] = deque()
        if in_ray:
            # a plain function, not the bound method: Serve keeps its multiplexer as an
            # attribute of the decorated callable, which a bound method cannot take
            async def load(ref: str) -> AdapterLease:
                return await self._load(ref)

            self._get = serve.multiplexed(max_num_models_per_replica=max_adapters)(load)
        else:
            self._get = self._get_local

    async def prepare(self, manifest: AdapterManifest) -> str:
        """Make the request's adapter loaded here (through the multiplexer); its engine name."""
        ref = manifest.ref
        known = self._manifests.get(ref)
        if known is not None and known.sha256 != manifest.sha256:
            await self.drop(ref)  # same ref, other bytes: a stale copy must not serve
        self._remember(manifest)
        self.retire_evicted()
        lease = await self._get(ref)
        self.retire_evicted()  # Serve may have evicted another adapter to make room
        if lease.closed:  # evicted between load and use: the runner reloads on demand
            log.debug("adapter %s lease closed before use", ref)
        return ref

    def _remember(self, manifest: AdapterManifest) -> None:
        self._manifests[manifest.ref] = manifest
        self._manifests.move_to_end(manifest.ref)
        while len(self._manifests) > MAX_REMEMBERED_MANIFESTS:
            self._manifests.popitem(last=False)

    async def _load(self, ref: str) -> AdapterLease:
        """The multiplexed loader: fetch the bundle, load it on the worker thread."""
        manifest = self._manifests.get(ref)
        if manifest is None:
            if parse_model_ref(ref)[1] is None:
                raise ModelNotFound(f"multiplexed model id {ref!r} must be name@version")
            manifest = await asyncio.to_thread(self.resolver.resolve, ref)
            self._remember(manifest)
        bundle = await asyncio.to_thread(self.resolver.fetch_bundle, manifest)
        await self.scheduler.call(self._engine_load, ref, bundle)
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
        """Unload `ref` from the engine on the worker thread, between batches (any thread)."""
        if self._leases.get(ref) is not None and self._leases[ref].closed:
            self._leases.pop(ref, None)
        self.scheduler.post(lambda: self._engine_unload(ref))

    async def drop(self, ref: str) -> None:
        """Forget `ref`'s bytes here, manifest and engine copy (a deleted or replaced version)."""
        self._manifests.pop(ref, None)
        await self.scheduler.call(self._engine_unload, ref)

    # ------------------------------------------------------------------ worker thread

    def _engine_load(self, ref: str, bundle: AdapterBundle) -> None:
        self.engine.load_adapter(ref, bundle)
        self._on_change()

    def _engine_unload(self, ref: str) -> None:
        """Unload `ref` unless it was loaded again since this was queued; a stream still
        using it keeps it until the stream ends (the engine's lease, not counted here)."""
        lease = self._leases.get(ref)
        if lease is not None and not lease.closed and ref in self._manifests:
            return
        try:
            self.engine.unload_adapter(ref)
        except AdapterNotLoaded:
            pass
        self._on_change()

    def reload(self, ref: str) -> None:
        """The engine evicted (or the multiplexer unloaded) `ref` while requests for it waited."""
        manifest = self._manifests.get(ref)
        if manifest is None:
            raise ModelNotFound(f"adapter {ref} is no longer available")
        self.engine.load_adapter(ref, self.resolver.fetch_bundle(manifest))

    def with_adapter(self, refs: list[str | None], fn: Callable[[], T]) -> T:
        """`fn()`; if the engine says an adapter is not loaded (evicted, unloaded or replaced
        since the request was queued), reload those of `refs` it lacks and try once more."""
        try:
            return fn()
        except AdapterNotLoaded:
            if all(r is None for r in refs):
                raise
            for ref in dict.fromkeys(r for r in refs if r is not None and not self.engine.has_adapter(r)):
                self.reload(ref)
            return fn()
        finally:
            self._on_change()

    # ------------------------------------------------------------------ deletion sweep

    async def sweep(self) -> list[str]:
        """Drop every held adapter version the registry no longer has; returns the refs dropped.

        Also retires leases evicted since the last request (this runs every poll period)."""
        self.retire_evicted()
        by_name: dict[str, list[str]] = {}
        for ref in list(self._manifests):
            by_name.setdefault(parse_model_ref(ref)[0], []).append(ref)
        dropped: list[str] = []
        for name, refs in by_name.items():
            live = set(await asyncio.to_thread(self.store.version_numbers, name))
            gone = [r for r in refs if parse_model_ref(r)[1] not in live]
            for ref in gone:
                await self.drop(ref)
                dropped.append(ref)
            if gone:
                self.resolver.forget(name)
        if dropped:
            log.info("dropped deleted adapters %s", dropped)
        return dropped

