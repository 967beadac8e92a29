"""The model deployment: a thin shim over the engine, one per replica.

Duties, and nothing else:

1. Build the engine once per replica, with torch threads set from the replica's CPU
   share (Ray sets OMP_NUM_THREADS=1 inside replicas).
2. Load adapters by multiplexed model id (`name@version`) through `@serve.multiplexed`,
   so Ray routes an adapter's requests to replicas that already hold it and unloads the
   least recently used beyond `max_adapters_per_replica`. Base-model requests carry no
   multiplexed id and are load-balanced.
3. Queue every request on the replica's `Scheduler`, which batches by adapter and runs
   every engine call (adapter loads and unloads included) on one worker thread; with
   `adapter_mode="adaptive"` it may run mixed-adapter batches (`run_mixed_batch`).
4. Drop adapters deleted from the registry: every `registry_poll_s` the replica checks
   the versions it holds against the store and unloads the missing ones from the
   engine, the multiplexer and the blob cache. (The ingress already answers 404 for
   them at once, as it resolves every request against the store.)
5. Attach a `ReplicaReport` (metric events since its previous answer) to every answer.

`ModelServer(config, engine=...)` also works outside Ray, for tests of the shim itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from typing import Any

import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from adapters.manifest import AdapterManifest, parse_model_ref
from adapters.registry.backends import open_store
from adapters.registry.resolver import AdapterResolver
from serving.config import ServeConfig
from serving.engine.engine import Engine
from serving.errors import AdapterNotLoaded, InvalidRequest, ModelNotFound
from serving.metrics import ReplicaReport
from serving.replica_io import (
    ClassOutput,
    GenerationResult,
    ReplicaCall,
    ReplicaInfo,
    ReplicaResult,
    ServedBy,
    StreamItem,
)
from serving.scheduler import BatchInfo, Kind, Scheduler

log = logging.getLogger("capaserve.replica")

#: Manifests a replica remembers to reload evicted adapters without a registry lookup.
MAX_REMEMBERED_MANIFESTS = 4096


def _replica_id() -> str:
    """This replica's unique id inside Ray Serve; "local" outside it (tests of the shim)."""
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except RayServeException:
        return "local"


def _estimate_tokens(text: str) -> int:
    """Cheap token estimate for batching decisions (exact counts come from the engine)."""
    return len(text) // 4 + 2


class _AdapterLease:
    """What the multiplexer caches per adapter: evicting it unloads the adapter from the engine.

    `serve.multiplexed` calls a cached object's `__del__` when it evicts it (its documented
    unload hook), and Python calls it again at garbage collection; `close` acts once, and
    hands the engine unload to the worker thread, never running it on the caller's.
    """

    def __init__(self, server: "ModelServer", ref: str) -> None:
        self.server = server
        self.ref = ref
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.server._retire(self.ref)

    def __del__(self) -> None:
        if hasattr(self, "closed"):  # a half-built lease has nothing to release
            self.close()


class ModelServer:
    """The model deployment's replica class (see the module docstring for its duties)."""

    def __init__(self, config: ServeConfig | dict[str, Any], engine: Engine | None = None) -> None:
        self.config = config if isinstance(config, ServeConfig) else ServeConfig.model_validate(config)
        torch.set_num_threads(self.config.torch_threads())
        self.engine = engine if engine is not None else Engine(self.config.engine)
        registry = self.config.registry
        self.store = open_store(registry.location, endpoint_url=registry.endpoint_url)
        self.resolver = AdapterResolver(self.store, registry.blob_cache_bytes)
        # the padding split depends on the device (padding is nearly free on a GPU)
        self.scheduler = Scheduler(self, self.config.scheduler, device_type=self.engine.device.type)
        self.replica = _replica_id()
        self._manifests: OrderedDict[str, AdapterManifest] = OrderedDict()
        self._leases: dict[str, _AdapterLease] = {}
        self._stats = self.engine.stats()  # refreshed on the worker thread only
        self._reported = self._stats
        self._swap_events: list[float] = []
        self._sweeper: asyncio.Task | None = None
        self._reported_mode_switches = 0

        async def load_adapter(ref: str) -> _AdapterLease:
            return await self._load(ref)

        self._multiplex_fn = load_adapter
        in_replica = self.replica != "local"
        if in_replica:
            self._get_adapter = serve.multiplexed(max_num_models_per_replica=self.config.registry.max_adapters_per_replica)(
                load_adapter
            )
        else:
            self._get_adapter = self._get_adapter_local

    # ------------------------------------------------------------------ Ray hooks

    async def check_health(self) -> None:
        """Ray's health check: the worker thread must be alive (a stuck engine is unhealthy)."""
        self._ensure_background()

    async def info(self) -> ReplicaInfo:
        self._ensure_background()
        e = self.engine
        return ReplicaInfo(
            model_id=e.model_id,
            task=e.task.value,
            spec=e.spec.to_dict(),
            has_chat_template=bool(getattr(e.tokenizer, "chat_template", None)),
            max_seq_len=e.max_len,
            replica=self.replica,
        )

    async def loaded_adapters(self) -> list[str]:
        """Names the engine holds now (for tests and operators)."""
        return [a.name for a in await self.scheduler.call(self.engine.list_adapters)]

    # ------------------------------------------------------------------ requests

    async def embed(self, call: ReplicaCall) -> ReplicaResult:
        return await self._batch("embed", call)

    async def classify(self, call: ReplicaCall) -> ReplicaResult:
        if call.adapter is None:
            raise InvalidRequest("classify needs a sequence-classification adapter; the base model has no labels")
        return await self._batch("classify", call)

    async def generate(self, call: ReplicaCall) -> ReplicaResult:
        if call.params is None:
            raise InvalidRequest("generation needs sampling parameters")
        if call.messages is not None:
            call = call.model_copy(update={"texts": [await self._template(call.messages)], "messages": None})
        return await self._batch("generate", call)

    async def generate_stream(self, call: ReplicaCall) -> AsyncIterator[StreamItem]:
        """Stream one generation; closing the stream (client gone) stops it between tokens."""
        if call.params is None:
            raise InvalidRequest("generation needs sampling parameters")
        ref = await self._prepare(call)
        prompt = await self._template(call.messages) if call.messages is not None else call.texts[0]
        first = True
        agen = self.scheduler.stream(ref, prompt, length=_estimate_tokens(prompt), params=call.params)
        try:
            async for (delta, prompt_tokens), info in agen:
                item = StreamItem(
                    text=delta.text, completion_tokens=len(delta.token_ids), finish_reason=delta.finish_reason
                )
                if first:
                    item.prompt_tokens = prompt_tokens
                    item.served_by = self._served_by(info)
                    first = False
                if delta.finish_reason is not None:
                    item.report = self._report()
                yield item
        finally:
            await agen.aclose()

    async def _batch(self, kind: Kind, call: ReplicaCall) -> ReplicaResult:
        ref = await self._prepare(call)
        if not call.texts:
            raise InvalidRequest("no input given")
        lengths = [_estimate_tokens(t) + (call.params.max_tokens if call.params else 0) for t in call.texts]
        outs, info = await self.scheduler.submit(kind, ref, call.texts, lengths=lengths, params=call.params)
        outputs = [o[0] for o in outs]
        tokens = [o[1] for o in outs]
        return ReplicaResult(outputs=outputs, prompt_tokens=tokens, served_by=self._served_by(info), report=self._report())

    async def _prepare(self, call: ReplicaCall) -> str | None:
        """Make the call's adapter loaded here (through the multiplexer); its engine name."""
        self._ensure_background()
        if call.adapter is None:
            return None
        ref = call.adapter.ref
        known = self._manifests.get(ref)
        if known is not None and known.sha256 != call.adapter.sha256:
            await self._drop(ref)  # same ref, other bytes: a stale copy must not serve
        self._remember(call.adapter)
        lease = await self._get_adapter(ref)
        if lease.closed:  # evicted between load and use: the runner reloads on demand
            log.debug("adapter %s lease closed before use", ref)
        return ref

    async def _template(self, messages: list[dict[str, str]]) -> str:
        return await asyncio.to_thread(self.engine.apply_chat_template, messages)

    # ------------------------------------------------------------------ adapters

    def _remember(self, manifest: AdapterManifest) -> None:
        self._manifests[manifest.ref] = manifest
        self._manifests.move_to_end(manifest.ref)
        while len(self._manifests) > MAX_REMEMBERED_MANIFESTS:
            self._manifests.popitem(last=False)

    async def _load(self, ref: str) -> _AdapterLease:
        """The multiplexed loader: fetch the bundle, load it on the worker thread."""
        manifest = self._manifests.get(ref)
        if manifest is None:
            name, version = parse_model_ref(ref)
            if version is None:
                raise ModelNotFound(f"multiplexed model id {ref!r} must be name@version")
            manifest = await asyncio.to_thread(self.resolver.resolve, ref)
            self._remember(manifest)
        bundle = await asyncio.to_thread(self.resolver.fetch_bundle, manifest)
        await self.scheduler.call(self._engine_load, ref, bundle)
        lease = _AdapterLease(self, ref)
        self._leases[ref] = lease
        return lease

    async def _get_adapter_local(self, ref: str) -> _AdapterLease:
        """Outside Ray: the same loader with a plain LRU in place of serve.multiplexed."""
        lease = self._leases.get(ref)
        if lease is not None and not lease.closed:
            return lease
        lease = await self._load(ref)
        live = [r for r, lz in self._leases.items() if not lz.closed]
        while len(live) > self.config.registry.max_adapters_per_replica:
            self._leases.pop(live.pop(0)).close()
        return lease

    def _retire(self, ref: str) -> None:
        """Unload `ref` from the engine on the worker thread, between batches (any thread)."""
        if self._leases.get(ref) is not None and self._leases[ref].closed:
            self._leases.pop(ref, None)
        self.scheduler.post(lambda: self._engine_unload(ref))

    async def _drop(self, ref: str) -> None:
        """Forget `ref`'s bytes on this replica: manifest and engine (a deleted or replaced version).

        The multiplexer keeps its lease (Serve has no public call to evict one): Serve may
        route that id here until the lease ages out of its LRU, which is harmless, since the
        ingress answers 404 for a deleted version and a replaced one is reloaded from its new
        manifest on first use (`_with_adapter`); the lease's eventual close is then a no-op
        or unloads the reloaded copy, as for any evicted adapter.
        """
        self._manifests.pop(ref, None)
        await self.scheduler.call(self._engine_unload, ref)

    # ------------------------------------------------------------------ worker thread

    def _engine_load(self, ref: str, bundle: Any) -> None:
        self.engine.load_adapter(ref, bundle)
        self._refresh_stats()

    def _engine_unload(self, ref: str) -> None:
        """Unload `ref` unless it was loaded again since this was queued; a stream still
        using it keeps it until the stream ends (the engine's lease, not counted here)."""
        lease = self._leases.get(ref)
        if lease is not None and not lease.closed and ref in self._manifests:
            return  # loaded again since this unload was queued
        try:
            self.engine.unload_adapter(ref)
        except AdapterNotLoaded:
            pass
        self._refresh_stats()

    def _reload(self, ref: str) -> None:
        """The engine evicted (or the multiplexer unloaded) `ref` while requests for it waited."""
        manifest = self._manifests.get(ref)
        if manifest is None:
            raise ModelNotFound(f"adapter {ref} is no longer available")
        self.engine.load_adapter(ref, self.resolver.fetch_bundle(manifest))

    def _with_adapter(self, ref: str | None, fn: Any) -> Any:
        try:
            return fn()
        except AdapterNotLoaded:
            if ref is None:
                raise
            self._reload(ref)
            return fn()
        finally:
            self._refresh_stats()

    def run_batch(self, kinds: list[Kind], adapter: str | None, texts: list[str], params: Any) -> list[Any]:
        """BatchRunner: one engine call (text i is a kinds[i] request); (output, prompt_tokens) per text."""
        e = self.engine
        if _generation(kinds):
            return _generation_results(self._with_adapter(adapter, lambda: e.generate(texts, adapter, params)))
        return _encoder_results(self._with_adapter(adapter, lambda: e.encode(texts, [adapter] * len(texts), kinds)))

    def run_mixed_batch(
        self, kinds: list[Kind], adapters: list[str | None], texts: list[str], params: Any = None
    ) -> list[Any]:
        """BatchRunner, adaptive mode: one unmerged engine call, text i with adapters[i]."""
        e = self.engine
        generation = _generation(kinds)

        def call() -> Any:
            if generation:
                return e.generate_mixed(texts, adapters, params)
            return e.encode(texts, adapters, kinds, mixed=True)

        try:
            out = self._with_adapter(None, call)
        except AdapterNotLoaded:
            for ref in dict.fromkeys(a for a in adapters if a is not None):  # evicted meanwhile: reload
                if not e.has_adapter(ref):
                    self._reload(ref)
            out = self._with_adapter(None, call)
        return _generation_results(out) if generation else _encoder_results(out)

    def run_stream(self, adapter: str | None, prompt: str, params: Any) -> Iterator[Any]:
        """BatchRunner: (delta, prompt_tokens) pairs of one streamed generation."""
        e = self.engine
        prompt_tokens = e.count_tokens([prompt])
        gen = self._with_adapter(adapter, lambda: e.generate_stream(prompt, adapter, params))
        try:
            for delta in gen:
                yield delta, prompt_tokens
        finally:
            gen.close()
            self._refresh_stats()

    def _refresh_stats(self) -> None:
        stats = self.engine.stats()
        new_swaps = stats.swaps - self._stats.swaps
        if new_swaps > 0:
            per = (stats.swap_seconds_total - self._stats.swap_seconds_total) / new_swaps
            self._swap_events.extend([stats.last_swap_seconds] if new_swaps == 1 else [per] * new_swaps)
        self._stats = stats

    # ------------------------------------------------------------------ reporting

    def _served_by(self, info: BatchInfo) -> ServedBy:
        return ServedBy(
            replica=self.replica, batch_size=info.batch_size, swapped=info.swapped, queue_ms=info.queue_seconds * 1000
        )

    def _report(self) -> ReplicaReport:
        """Events since the previous report (handed over once), plus gauges now."""
        now, before = self._stats, self._reported
        swaps, self._swap_events = self._swap_events, []
        sched = self.scheduler.stats(drain=True)
        self._reported = now
        mode_switches = max(0, sched.mode_switches - self._reported_mode_switches)
        self._reported_mode_switches = sched.mode_switches
        return ReplicaReport(
            replica=self.replica,
            swap_seconds=swaps,
            cache_hits=max(0, now.cache_hits - before.cache_hits),
            cache_misses=max(0, now.cache_misses - before.cache_misses),
            cache_evictions=max(0, now.cache_evictions - before.cache_evictions),
            batch_sizes=sched.batch_sizes,
            cache_bytes=now.cache_bytes,
            queue_depth=sched.queue_depth,
            loaded_adapters=now.loaded_adapters,
            adapter_mode=sched.mode,
            mode_switches=mode_switches,
        )

    # ------------------------------------------------------------------ deletion sweep

    def _ensure_background(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.registry.poll_s)
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - a flaky store must not kill the replica
                log.warning("registry sweep failed", exc_info=True)

    async def sweep(self) -> list[str]:
        """Drop every held adapter version the registry no longer has; returns the refs dropped."""
        by_name: dict[str, list[str]] = {}
        for ref in list(self._manifests):
            by_name.setdefault(parse_model_ref(ref)[0], []).append(ref)
        dropped: list[str] = []
        for name, refs in by_name.items():
            live = set(await asyncio.to_thread(self.store.version_numbers, name))
            gone = [r for r in refs if parse_model_ref(r)[1] not in live]
            for ref in gone:
                await self._drop(ref)
                dropped.append(ref)
            if gone:
                self.resolver.forget(name)
        if dropped:
            log.info("dropped deleted adapters %s", dropped)
        return dropped

    def __del__(self) -> None:
        """Serve's replica shutdown hook: stop the worker thread (queued work is dropped)."""
        sched = getattr(self, "scheduler", None)
        if sched is not None:
            sched.shutdown()


def _generation(kinds: list[Kind]) -> bool:
    """Whether a batch is generation (all rows) or encoder work (embed/classify rows, mixable)."""
    if all(k == "generate" for k in kinds):
        return True
    if any(k not in ("embed", "classify") for k in kinds):
        raise InvalidRequest(f"a batch holds generate rows only, or embed/classify rows only; got {sorted(set(kinds))}")
    return False


def _generation_results(outs: list[Any]) -> list[Any]:
    return [
        (
            GenerationResult(
                text=o.text, finish_reason=o.finish_reason, prompt_tokens=o.prompt_tokens,
                completion_tokens=o.completion_tokens,
            ),
            o.prompt_tokens,
        )
        for o in outs
    ]


def _encoder_results(rows: list[Any]) -> list[Any]:
    """EncodedRow -> (embedding list | ClassOutput, prompt_tokens): what the ingress answers with."""
    return [
        (
            r.embedding.tolist()
            if r.task == "embed"
            else ClassOutput(label=r.label, probs=r.probs.tolist(), label_names=list(r.label_names or [])),
            r.prompt_tokens,
        )
        for r in rows
    ]
