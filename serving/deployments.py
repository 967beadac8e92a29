"""The model deployment: a thin shim over the engine, one per replica.

Duties, and nothing else:

1. Build the engine once per replica; its engine workers and their torch threads follow
   the replica's CPU share (`ServeConfig.engine_plan`; Ray sets OMP_NUM_THREADS=1 inside
   replicas).
2. Load adapters by multiplexed model id (`name@version`) through `@serve.multiplexed`,
   so Ray routes an adapter's requests to replicas that already hold it and unloads the
   least recently used beyond `max_adapters_per_replica` (serving/replica_adapters.py,
   which also states why only Serve's public API is used). By default that count is
   derived from bytes so that it never binds before the engine's byte budget does
   (`adapter_cache.count_bound`): with a fixed 64, a round-robin over 300 small adapters
   reloaded a bundle for 989 of every 1,000 requests though all fit the budget. Base-model requests carry no
   multiplexed id and are load-balanced.
3. Queue every request on the replica's `Scheduler`, which batches by adapter and runs
   every engine call on its engine workers through an `EngineRunner`
   (serving/replica_runner.py), never on the event loop; with `adapter_mode="adaptive"` it
   may run mixed-adapter batches. The flow goes one way: deployment -> scheduler -> runner
   -> engine. An adapter that is not resident is fetched and loaded on `ReplicaAdapters`'
   loader thread; its requests wait in the scheduler (counted against `max_queue`) on the
   readiness future `ReplicaAdapters.admit` returns, while other adapters' batches run. One
   evicted between admission and its batch is admitted again, once.
4. Drop adapters deleted from the registry: every `registry.poll_s` the replica checks
   the versions it holds against the store and unloads the missing ones from the
   engine, the multiplexer and the blob cache. (The ingress already answers 404 for
   them at once, as it resolves every request against the store.)
5. Attach a `ReplicaReport` (metric events since its previous answer) to every answer
   (serving/replica_report.py).

`ModelServer(config, engine=...)` also works outside Ray, for tests of the shim itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from adapters.registry.backends import open_store
from adapters.registry.resolver import AdapterResolver
from serving.cluster_env import RegistryEnv
from serving.coalesce import JOINABLE
from serving.config import ServeConfig
from serving.engine.adapter_cache import count_bound
from serving.engine.engine import Engine
from adapters.tasks.errors import AdapterNotLoaded, InvalidRequest
from adapters.tasks.kinds import RequestKind
from adapters.tasks.qa import QAInput
from serving.metrics import ReplicaReport
from serving.replica_adapters import ReplicaAdapters
from serving.replica_io import GenerationResult, ReplicaCall, ReplicaInfo, ReplicaResult, StreamItem
from serving.registry_probe import RegistryProbe
from serving.replica_logging import log_to_stderr
from serving.replica_report import ReplicaReporter
from serving.replica_runner import EngineRunner
from serving.scheduler import Scheduler

log = logging.getLogger("capaserve.replica")


def _replica_id() -> str:
    """This replica's unique id inside Ray Serve; "local" outside it (tests of the shim)."""
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except RayServeException:
        return "local"


def _estimate_tokens(text: str) -> int:
    """Cheap token estimate for batching decisions (exact counts come from the engine)."""
    return len(text) // 4 + 2


def _estimate_input(item: Any, image_tokens: int) -> int:
    """The estimate for any encoder input: a text, a question with its context, or an image
    (whose rows all have the base's `image_tokens` positions)."""
    if isinstance(item, QAInput):
        return _estimate_tokens(item.question) + _estimate_tokens(item.context)
    if isinstance(item, (bytes, bytearray)):
        return image_tokens
    return _estimate_tokens(item)


class ModelServer:
    """The model deployment's replica class (see the module docstring for its duties)."""

    def __init__(
        self, config: ServeConfig | dict[str, Any], engine: Engine | None = None, registry_env: RegistryEnv | None = None
    ) -> None:
        self.config = ServeConfig.model_validate(config)  # a ServeConfig passes through as is
        if registry_env is not None:
            registry_env.apply()  # the driver's registry credentials (serving/cluster_env.py)
        self.engine = engine if engine is not None else Engine(self.config.engine)
        workers, threads = self.config.engine_plan(self.engine.device.type)
        torch.set_num_threads(threads)
        registry = self.config.registry
        self.store = open_store(registry.location, endpoint_url=registry.endpoint_url)
        self.resolver = AdapterResolver(self.store, registry.blob_cache_bytes)
        self.replica = _replica_id()
        if self.replica != "local":
            log_to_stderr()
        self.reporter = ReplicaReporter(self.replica, self.engine.stats())
        self.runner = EngineRunner(
            self.engine, observe=self.reporter.observe, scheduler=self.config.scheduler,
            decode_threads=threads,
        )
        # the padding split depends on the device (padding is nearly free on a GPU)
        self.scheduler = Scheduler(
            self.runner, self.config.scheduler, device_type=self.engine.device.type, workers=workers,
            unpadded=self.engine.unpadded,
        )
        # a count bound that can never bind before the byte budget (adapter_cache.count_bound)
        max_adapters = registry.max_adapters_per_replica or count_bound(
            self.config.engine.adapter_cache_bytes, self.engine.spec.linear_shapes.values()
        )
        self.adapters = ReplicaAdapters(
            self.engine, self.store, self.resolver, max_adapters,
            in_ray=self.replica != "local", on_change=lambda: self.reporter.observe(self.engine.stats()),
        )
        self._sweeper: asyncio.Task | None = None
        self.registry_probe = RegistryProbe(self.store, f"model replica {self.replica}")

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
            registry_error=await self.registry_probe.error(),
            precision=e.precision,
        )

    async def loaded_adapters(self) -> list[str]:
        """Names the engine holds now (for tests and operators)."""
        return [a.name for a in self.engine.list_adapters()]

    # ------------------------------------------------------------------ requests

    async def embed(self, call: ReplicaCall) -> ReplicaResult:
        return await self._batch(RequestKind.EMBED, call)

    async def classify(self, call: ReplicaCall) -> ReplicaResult:
        if call.adapter is None:
            raise InvalidRequest("classify needs a classification adapter; the base model has no labels")
        return await self._batch(RequestKind.CLASSIFY, call)

    async def question_answering(self, call: ReplicaCall) -> ReplicaResult:
        if call.adapter is None:
            raise InvalidRequest("question answering needs a question-answering adapter; the base model has no QA head")
        return await self._batch(RequestKind.QA, call)

    async def call_many(self, method: str, calls: list[ReplicaCall]) -> list[ReplicaResult | BaseException]:
        """Requests the ingress joined (serving/coalesce.py), one per adapter, each answered as if
        sent alone; a failed one comes back as its exception, in its place, and fails no other."""
        if method not in JOINABLE:
            raise InvalidRequest(f"{method!r} requests cannot be joined")
        run = getattr(self, method)
        return list(await asyncio.gather(*(run(c) for c in calls), return_exceptions=True))

    async def generate(self, call: ReplicaCall) -> ReplicaResult:
        if call.params is None:
            raise InvalidRequest("generation needs sampling parameters")
        if call.messages is not None:
            call = call.model_copy(update={"texts": [await self._template(call.messages)], "messages": None})
        return await self._batch(RequestKind.GENERATE, call)

    async def generate_stream(self, call: ReplicaCall) -> AsyncIterator[StreamItem]:
        """Stream one generation; closing the stream (client gone) stops it between tokens."""
        if call.params is None:
            raise InvalidRequest("generation needs sampling parameters")
        prompt = await self._template(call.messages) if call.messages is not None else call.texts[0]
        first = True
        for again in (False, True):
            ref, ready = await self._admit(call)
            agen = self.scheduler.stream(ref, prompt, params=call.params, ready=ready)
            try:
                async for (delta, prompt_tokens), info in agen:
                    item = StreamItem(
                        text=delta.text, completion_tokens=len(delta.token_ids), finish_reason=delta.finish_reason
                    )
                    if first:
                        item.prompt_tokens = prompt_tokens
                        item.served_by = self.reporter.served_by(info)
                        first = False
                    if delta.finish_reason is not None:
                        item.report = self.report()
                    yield item
                return
            except AdapterNotLoaded:
                if again or not first or ref is None:
                    raise  # evicted twice, or mid-stream: not retried
            finally:
                await agen.aclose()
                self._release(ref)

    async def _batch(self, kind: RequestKind, call: ReplicaCall) -> ReplicaResult:
        inputs = call.inputs()
        if not inputs:
            raise InvalidRequest("no input given")
        image_tokens = self.engine.images.tokens if self.engine.images is not None else 1
        extra = call.params.max_tokens if call.params else 0
        lengths = [_estimate_input(x, image_tokens) + extra for x in inputs]
        for again in (False, True):
            ref, ready = await self._admit(call)
            try:
                outs, info = await self.scheduler.submit(
                    kind, ref, inputs, lengths=lengths, params=call.params, ready=ready
                )
                break
            except AdapterNotLoaded:
                if again or ref is None:
                    raise  # evicted again (under the engine's byte budget) between admission and its batch
            finally:
                self._release(ref)
        outputs = [_generation_result(o[0]) if kind == RequestKind.GENERATE else o[0] for o in outs]
        tokens = [o[1] for o in outs]
        return ReplicaResult(outputs=outputs, prompt_tokens=tokens, served_by=self.reporter.served_by(info), report=self.report())

    async def _admit(self, call: ReplicaCall) -> tuple[str | None, asyncio.Future[None] | None]:
        """The call's adapter (its engine name, held until `_release`) and the future of its
        residency (None: resident now)."""
        self._ensure_background()
        if call.adapter is None:
            return None, None
        return call.adapter.ref, await self.adapters.admit(call.adapter)

    def _release(self, ref: str | None) -> None:
        if ref is not None:
            self.adapters.release(ref)

    def report(self) -> ReplicaReport:
        """Engine and scheduler events since the previous answer (serving/replica_report.py)."""
        return self.reporter.report(self.scheduler.stats(drain=True))

    async def _template(self, messages: list[dict[str, str]]) -> str:
        return await asyncio.to_thread(self.engine.apply_chat_template, messages)

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
        return await self.adapters.sweep()

    def __del__(self) -> None:
        """Serve's replica shutdown hook: stop the engine workers and the loader thread (queued work is dropped)."""
        for part in (getattr(self, "scheduler", None), getattr(self, "adapters", None)):
            if part is not None:
                part.shutdown()



def _generation_result(o: Any) -> GenerationResult:
    """A decode-loop GenerationOutput as the ingress reads it (a causal base always has a decode loop)."""
    return GenerationResult(
        text=o.text, finish_reason=o.finish_reason, prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens
    )
