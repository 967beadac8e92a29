"""A per-replica asyncio scheduler: group requests by adapter, batch them, run them serially.

Why: swapping an adapter rewrites weights, so the cheapest order serves every queued
request of the active adapter before moving on, and batches them. Policy, per step:

1. Adapter choice. Keep the active adapter while it has work, unless some other
   adapter's oldest request has waited longer than `starvation_ms`; then switch. A switch
   goes round-robin over tenants (`tenant/name` adapters; shared names and the base count
   as one more tenant), then to that tenant's adapter whose oldest request waited longest,
   so a tenant with many adapters' work queued cannot take every turn from another.
   So no adapter and no tenant waits unboundedly.
2. Batch fill. Wait up to `batch_wait_ms` (from the arrival of the head request; 0 by
   default, so a free worker starts at once) for up to `max_batch_size` compatible requests: embeddings, classify and question-answering
   requests share one encoder forward (each row gets its own head).
3. Padding. A batch's texts are sorted by length and split into engine calls whose
   padded size (texts x longest) stays under `max_batch_tokens`. Encoder batches are
   split further where that is cheaper: cuts are chosen to minimise the sum over calls
   of `call_overhead_tokens` + texts x longest (on a CPU 256 tokens: a call's fixed cost is
   mostly reading the weights, see `SchedulerConfig.call_overhead`). Padding a batch of
   mixed lengths to its longest wasted about a quarter of the forward in the load test.
   A runner whose encoder forwards compute only real tokens (`unpadded`: BERT bases,
   serving/engine/unpadded.py) has no padding to save: its batch is cut into one call per
   free engine worker at equal shares of the tokens (fewer while a call would get less than
   `call_overhead_tokens`), then only where the cap needs it (cuts made for padding made
   unpadded forwards slower: loadtest/results/overheads.md).
4. Execution. Engine calls run on `workers` engine threads, never on the event loop, so
   the replica keeps accepting requests while the model computes. Batches run side by
   side only when they need the weights in the same state (the same adapter merged; base
   and mixed batches share the pristine weights): a batch for another adapter waits until
   the running ones end, so workers never make swaps more frequent (the engine enforces
   the same rule for every forward).

5. Mixed-adapter batches (`adapter_mode="adaptive"`, runners with `run_mixed_batch`).
   A `ModePolicy` watches the waiting requests per adapter; while it says mixed, the
   oldest encoder request heads a batch filled with the oldest compatible
   requests (as in 2) whatever their adapter (base included),
   run unmerged in one engine call.

6. Generation (runners with `decode_loop`, as the model server): completions and streams
   go to the replica's continuous-batching decode loop (serving/engine/continuous.py), which
   admits each prompt at the next decode step with its own sampling parameters and picks
   merged or unmerged adapters per step; the queue bound (`max_queue`) counts the sequences
   waiting there too. Generation has no other path: a runner without a decode loop (an
   encoder base) refuses it with UnsupportedTask, and the queues above hold encoder
   requests only.

With `grouping=False` each request runs alone in arrival order: the swap-per-request
baseline the load test compares against. A full queue raises `Overloaded` (503).

6. Adapter readiness is an input. A request may come with `ready`, an awaitable that
   completes when its adapter is resident (the replica fetches a cold adapter from the
   registry on its loader thread, never on an engine worker). Until then the request waits
   outside the queues, counted against `max_queue`, and batches of other adapters keep
   running; when `ready` fails, the request fails with its error.

The scheduler knows nothing of the engine or the registry: it is given a `BatchRunner`
at construction and calls only that (one direction: deployment -> scheduler -> runner ->
engine).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, Field

from adapters.manifest import tenant_of
from serving.config import SchedulerConfig
from adapters.tasks.errors import Overloaded, UnsupportedTask
from adapters.tasks.kinds import ENCODER_KINDS, RequestKind
from serving.engine.continuous import DecodeLoop, GenSequence
from serving.mode_policy import ModePolicy


class BatchRunner(Protocol):
    """What the scheduler drives; implemented over the engine by the model deployment."""

    def run_batch(self, kinds: list[RequestKind], adapter: str | None, texts: list[Any]) -> list[Any]:
        """One encoder call (input i belongs to a kinds[i] request: a text, an image or a
        question); returns one result per input, in order."""

    # optional: def run_mixed_batch(self, kinds, adapters: list[str | None], texts) -> list[Any]
    # (one unmerged engine call, row i with adapters[i]); without it the scheduler stays merged.
    # optional: def decode_loop(self) -> DecodeLoop | None (None: the base does not generate) and
    # def prompt_ids(self, texts, params) -> list[list[int]]: generation (completions and
    # streams) runs by continuous batching on that loop (serving/engine/continuous.py).


@dataclass(frozen=True)
class BatchInfo:
    """How a request was served: reported in its log line and metrics."""

    batch_size: int
    swapped: bool
    queue_seconds: float


@dataclass
class _Item:
    """One queued encoder request; every kind of them can share a forward with any other."""

    kind: RequestKind
    adapter: str | None
    texts: list[Any]  # texts, images or questions
    lengths: list[int]
    future: asyncio.Future
    enqueued: float
    seq: int
    cold: bool = False  # waiting for its adapter to become resident (outside the queues)


_END = object()


class SchedulerStats(BaseModel):
    """Cumulative counters plus events since the last drain (for metrics deltas)."""

    queue_depth: int = Field(0, description="Requests waiting now.")
    requests: int = Field(0, description="Requests run so far.")
    batches: int = Field(0, description="Batches run so far.")
    adapter_switches: int = Field(0, description="Times the scheduler moved to another adapter.")
    batch_sizes: list[int] = Field(default_factory=list, description="Sizes of batches since the last drain.")
    mode: str = Field("merged", description="Adapter mode of the next batch: merged or mixed.")
    mode_switches: int = Field(0, description="Times the adapter mode switched between merged and mixed.")
    mixed_batches: int = Field(0, description="Batches run as mixed-adapter (unmerged) batches.")
    running_sequences: int = Field(0, description="Generation sequences in the continuous batch now.")
    sequences_cancelled: int = Field(0, description="Generation sequences dropped because their client left.")


class Scheduler:
    """Queues requests per adapter and runs them in batches on `workers` engine threads."""

    def __init__(
        self, runner: BatchRunner, config: SchedulerConfig | None = None, device_type: str = "cpu", workers: int = 1,
        unpadded: bool = False,
    ) -> None:
        self.runner = runner
        #: the runner's merged encoder calls cost their real tokens, not texts x longest
        self.unpadded = unpadded
        self.config = config or SchedulerConfig()
        self.workers = max(1, workers)
        self._running = 0  # batches on the workers now
        self._running_state: str | None = None  # the weights state they share (adapter; None: base/mixed)
        #: Padded tokens one encoder call costs on this device (see SchedulerConfig.call_overhead).
        self._call_overhead = self.config.call_overhead(device_type)
        self._queues: dict[str | None, deque[_Item]] = {}
        self._pending = 0  # requests queued or waiting for their adapter (both bounded by max_queue)
        self._cold = 0  # of those, waiting for their adapter to become resident
        self._seq = itertools.count()
        self._active: str | None | object = _END  # nothing run yet
        self._last_tenant = ""  # the tenant the last switch went to ("": shared names and the base)
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="capaserve-engine")
        self._task: asyncio.Task | None = None
        self._stats = SchedulerStats()
        self._new_batch_sizes: list[int] = []
        self._policy = ModePolicy(self.config.mode_policy)
        self._mixing = (
            self.config.adapter_mode == "adaptive" and self.config.grouping and hasattr(runner, "run_mixed_batch")
        )
        make_loop = getattr(runner, "decode_loop", None)
        self._decode: DecodeLoop | None = make_loop() if make_loop is not None else None

    # ------------------------------------------------------------------ public

    async def submit(
        self,
        kind: RequestKind,
        adapter: str | None,
        texts: Sequence[Any],
        *,
        lengths: Sequence[int] | None = None,
        params: Any = None,
        ready: asyncio.Future | None = None,
    ) -> tuple[list[Any], BatchInfo]:
        """Queue one request (its inputs run together) and wait for its results; with `ready`
        it joins its adapter's queue once `ready` is done (its error, if any, is the request's).
        Encoder kinds are batched here; a completion (`params`) goes to the decode loop."""
        if kind == RequestKind.GENERATE:
            self._decoder()  # refused before anything is queued on a base that does not generate
            if ready is not None:
                await asyncio.shield(ready)  # shared by every request of a cold adapter: never cancelled by one
            return await self._generate(adapter, list(texts), params)
        if kind not in ENCODER_KINDS:
            raise ValueError(f"{kind!r} requests are not queued: use stream() for a streamed generation")
        item = self._enqueue(kind, adapter, list(texts), lengths, ready)
        return await item.future

    async def stream(
        self,
        adapter: str | None,
        prompt: str,
        *,
        params: Any = None,
        ready: asyncio.Future | None = None,
    ) -> AsyncIterator[tuple[Any, BatchInfo]]:
        """One streamed generation on the decode loop; yields (delta, info) as it decodes.

        Closing the iterator early (client gone) cancels the generation between tokens,
        or drops it from the loop's queue if it has not started.
        """
        self._decoder()
        if ready is not None:
            await asyncio.shield(ready)
        async for out in self._stream_continuous(adapter, prompt, params):
            yield out

    def _decoder(self) -> DecodeLoop:
        """The decode loop, or UnsupportedTask (400) on a base that does not generate."""
        if self._decode is None:
            raise UnsupportedTask("text generation needs a causal LM base model; this replica serves an encoder")
        return self._decode

    def stats(self, drain: bool = False) -> SchedulerStats:
        """A snapshot; with drain=True the batch-size events are handed over and cleared."""
        snap = self._stats.model_copy(
            update={
                "queue_depth": self._pending,
                "batch_sizes": list(self._new_batch_sizes),
                "mode": self._policy.mode,
                "mode_switches": self._policy.switches,
            }
        )
        if self._decode is not None:
            snap.queue_depth += self._decode.waiting
            snap.running_sequences = self._decode.running
            snap.sequences_cancelled = self._decode.cancelled
        if drain:
            self._new_batch_sizes.clear()
        return snap

    def shutdown(self) -> None:
        """Stop at once from any thread (a replica's shutdown hook): queued work is dropped."""
        if self._task is not None:
            self._task.cancel()
        if self._decode is not None:
            self._decode.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def close(self) -> None:
        """Stop and wait for the dispatch task to end."""
        task = self._task
        self.shutdown()
        if task is not None:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    # ------------------------------------------------------------------ continuous generation

    async def _sequences(
        self, adapter: str | None, texts: list[str], params: Any, on_delta: Callable[[Any], None] | None,
        on_done: Callable[[int, Any, BaseException | None], None],
    ) -> tuple[list[GenSequence], list[tuple[float, int]]]:
        """Tokenize (a bad prompt raises here: 400), check the queue bound (503), queue one
        sequence per text on the decode loop; also the times each was admitted."""
        assert self._decode is not None
        if self._pending + self._decode.waiting >= self.config.max_queue:
            raise Overloaded(f"replica queue is full ({self.config.max_queue} requests); retry later")
        ids = await asyncio.to_thread(self.runner.prompt_ids, texts, params)  # type: ignore[attr-defined]
        started: list[tuple[float, int]] = []  # (when, batch size it joined) per admitted sequence
        seqs = [
            GenSequence(
                ids=p, adapter=adapter, params=params, on_delta=on_delta,
                on_done=lambda out, exc, i=i: on_done(i, out, exc),
                on_start=lambda n: started.append((time.monotonic(), n)),
            )
            for i, p in enumerate(ids)
        ]
        for seq in seqs:
            self._decode.check(seq)  # 400 for one that could never fit the KV budget, before any is queued
        for seq in seqs:
            self._decode.submit(seq)
        self._stats.requests += 1
        return seqs, started

    async def _generate(self, adapter: str | None, texts: list[str], params: Any) -> tuple[list[Any], BatchInfo]:
        """Complete each text on the decode loop; (GenerationOutput, prompt tokens) per text."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in texts]
        enqueued = time.monotonic()

        def done(i: int, out: Any, exc: BaseException | None) -> None:
            _threadsafe(loop, _settle, futures[i], out, exc)

        seqs, started = await self._sequences(adapter, texts, params, None, done)
        try:
            outs = await asyncio.gather(*futures)
        finally:
            for seq in seqs:
                seq.cancelled.set()  # a no-op for finished ones; frees the rest if the caller left
        info = _joined(started, enqueued)
        return [(o, o.prompt_tokens) for o in outs], info

    async def _stream_continuous(self, adapter: str | None, prompt: str, params: Any) -> AsyncIterator[tuple[Any, BatchInfo]]:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        enqueued = time.monotonic()

        def done(_i: int, _out: Any, exc: BaseException | None) -> None:
            _threadsafe(loop, deltas.put_nowait, exc if exc is not None else _END)

        (seq,), started = await self._sequences(
            adapter, [prompt], params, lambda d: _threadsafe(loop, deltas.put_nowait, d), done
        )
        try:
            info: BatchInfo | None = None
            while True:
                delta = await deltas.get()
                if delta is _END:
                    break
                if isinstance(delta, BaseException):
                    raise delta
                end = _coalesce(delta, deltas)  # the deltas a slow consumer missed, as one message
                if info is None:
                    info = _joined(started, enqueued)
                yield (delta, len(seq.ids)), info
                if end is not None:
                    if isinstance(end, BaseException):
                        raise end
                    break
        finally:
            seq.cancelled.set()  # the client left: the decode loop drops it before its next forward

    # ------------------------------------------------------------------ queueing

    def _enqueue(
        self,
        kind: RequestKind,
        adapter: str | None,
        texts: list[Any],
        lengths: Sequence[int] | None,
        ready: asyncio.Future | None = None,
    ) -> _Item:
        if self._pending >= self.config.max_queue:
            raise Overloaded(f"replica queue is full ({self.config.max_queue} requests); retry later")
        loop = asyncio.get_running_loop()
        item = _Item(
            kind=kind,
            adapter=adapter,
            texts=texts,
            lengths=list(lengths) if lengths is not None else [len(t) for t in texts],
            future=loop.create_future(),
            enqueued=time.monotonic(),
            seq=next(self._seq),
        )
        self._pending += 1
        if ready is None or (ready.done() and not ready.cancelled() and ready.exception() is None):
            self._queue(item)
        else:
            self._cold += 1
            item.cold = True
            ready.add_done_callback(lambda r: self._admit(item, r))
            item.future.add_done_callback(lambda f: self._forget(item) if f.cancelled() else None)
        return item

    def _queue(self, item: _Item) -> None:
        """Put a counted request into its adapter's queue and wake the dispatch loop."""
        if self._task is None or self._task.done():
            # a new dispatch loop gets a new event: an asyncio.Event binds to the first loop that
            # waits on it, and the scheduler may outlive that loop (asyncio.run per call in tests)
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        key = item.adapter if self.config.grouping else None
        self._queues.setdefault(key, deque()).append(item)
        self._wakeup.set()

    def _admit(self, item: _Item, ready: asyncio.Future) -> None:
        """`ready` is done (event loop): the waiting request joins its queue, or fails with its error."""
        if not item.cold:
            return  # cancelled while it waited: already forgotten
        item.cold = False
        self._cold -= 1
        error = asyncio.CancelledError() if ready.cancelled() else ready.exception()
        if error is not None:
            self._pending -= 1
            item.future.set_exception(error)
            return
        self._queue(item)

    def _forget(self, item: _Item) -> None:
        """A request cancelled while it waited for its adapter gives its queue place back at once."""
        if item.cold:
            item.cold = False
            self._cold -= 1
            self._pending -= 1

    def _pick_queue(self, now: float) -> str | None:
        """The adapter to serve next: the active one unless another is starving."""
        heads = {k: q[0] for k, q in self._queues.items() if q}
        if not self.config.grouping:
            return min(heads, key=lambda k: (heads[k].enqueued, heads[k].seq))
        if self._active in heads:
            others = [h for k, h in heads.items() if k != self._active]
            bound = self.config.starvation_ms / 1000.0
            if not others or now - min(h.enqueued for h in others) < bound:
                return self._active  # type: ignore[return-value]
        return self._next_tenant_queue(heads)

    def _next_tenant_queue(self, heads: dict[str | None, _Item]) -> str | None:
        """Round-robin over the tenants with work, then the oldest head of that tenant's queues."""
        by_tenant: dict[str, list[str | None]] = {}
        for k in heads:
            by_tenant.setdefault((tenant_of(k.partition("@")[0]) or "") if k else "", []).append(k)
        order = sorted(by_tenant)
        tenant = next((t for t in order if t > self._last_tenant), order[0])
        self._last_tenant = tenant
        return min(by_tenant[tenant], key=lambda k: (heads[k].enqueued, heads[k].seq))

    def _take_batch(self, key: str | None) -> list[_Item]:
        queue = self._queues[key]
        head = queue.popleft()
        batch = [head]
        if self.config.grouping:
            tokens = sum(head.lengths)
            rest: deque[_Item] = deque()
            while queue:
                it = queue.popleft()
                if len(batch) < self.config.max_batch_size and tokens + sum(it.lengths) <= self.config.max_batch_tokens:
                    batch.append(it)
                    tokens += sum(it.lengths)
                else:
                    rest.append(it)
            queue.extend(rest)
        if not queue:
            del self._queues[key]
        self._pending -= len(batch)
        return batch

    def _fillable(self, key: str | None) -> tuple[bool, float]:
        """(whether the head's batch could still grow, seconds left to wait for it)."""
        queue = self._queues[key]
        if not self.config.grouping:
            return False, 0.0
        left = queue[0].enqueued + self.config.batch_wait_ms / 1000.0 - time.monotonic()
        return len(queue) < self.config.max_batch_size, left

    # ------------------------------------------------------------------ loop

    async def _loop(self) -> None:
        while True:
            self._drop_cancelled()
            if self._pending == self._cold or self._running >= self.workers:
                self._wakeup.clear()
                await self._wakeup.wait()  # an arrival, or a batch done
                continue
            if self._mixing and await self._mixed_step():
                continue
            key = self._pick_queue(time.monotonic())
            growable, left = self._fillable(key)
            if growable and left > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=left)
                except asyncio.TimeoutError:
                    pass
                if key in self._queues:
                    growable, left = self._fillable(key)
                    if growable and left > 0:
                        continue  # more time to fill; re-pick in case of starvation
                else:
                    continue
            if not self._can_start(self._queues[key][0].adapter):
                await self._batch_done()
                continue
            self._start(self._take_batch(key))

    def _can_start(self, state: str | None) -> bool:
        """Whether a batch needing the weights in `state` may start beside the running ones."""
        return self._running == 0 or state == self._running_state

    async def _batch_done(self) -> None:
        """Wait until a running batch ends (or a request arrives: the policy may pick again)."""
        self._wakeup.clear()
        await self._wakeup.wait()

    def _start(self, batch: list[_Item], mixed: bool = False) -> None:
        """Count `batch` and run it on a free worker; the loop goes on picking meanwhile."""
        head = batch[0]
        target = None if mixed else head.adapter  # a mixed batch runs on the base weights
        swapped = self._active is not _END and self._active != target
        if self._active != target:
            self._stats.adapter_switches += int(self._active is not _END)
            self._active = target
        self._stats.mixed_batches += int(mixed)
        self._stats.batches += 1
        self._stats.requests += len(batch)
        self._new_batch_sizes.append(len(batch))
        self._running += 1
        self._running_state = target
        task = asyncio.get_running_loop().create_task(self._run_guarded(batch, mixed, swapped))
        task.add_done_callback(self._finished)

    def _finished(self, _task: asyncio.Task) -> None:
        self._running -= 1
        self._wakeup.set()

    async def _mixed_step(self) -> bool:
        """One step in mixed mode; False when the policy says merged."""
        if self._policy.decide(self._waiting(), time.monotonic()) != "mixed":
            return False
        head = min((q[0] for q in self._queues.values() if q), key=lambda it: (it.enqueued, it.seq))
        n = sum(len(q) for q in self._queues.values())
        left = head.enqueued + self.config.batch_wait_ms / 1000.0 - time.monotonic()
        if n < self.config.max_batch_size and left > 0:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=left)
            except asyncio.TimeoutError:
                pass
            return True  # decide again with what arrived meanwhile
        if not self._can_start(None):  # a mixed batch runs on the pristine weights
            await self._batch_done()
            return True
        self._start(self._take_mixed(), mixed=True)
        return True

    def _waiting(self) -> dict[str | None, int]:
        """Waiting requests per adapter: what the mode policy decides on."""
        counts: dict[str | None, int] = {}
        for q in self._queues.values():
            for it in q:
                counts[it.adapter] = counts.get(it.adapter, 0) + 1
        return counts

    def _take_mixed(self) -> list[_Item]:
        """The oldest requests over every adapter's queue, within the batch caps."""
        candidates = sorted((it for q in self._queues.values() for it in q), key=lambda it: (it.enqueued, it.seq))
        batch: list[_Item] = []
        tokens = 0
        for it in candidates:
            if batch and (len(batch) >= self.config.max_batch_size or tokens + sum(it.lengths) > self.config.max_batch_tokens):
                break
            batch.append(it)
            tokens += sum(it.lengths)
        taken = {id(it) for it in batch}
        for key in list(self._queues):
            kept = deque(it for it in self._queues[key] if id(it) not in taken)
            if kept:
                self._queues[key] = kept
            else:
                del self._queues[key]
        self._pending -= len(batch)
        return batch

    def _drop_cancelled(self) -> None:
        for key in list(self._queues):
            q = self._queues[key]
            kept = deque(it for it in q if not it.future.cancelled())
            self._pending -= len(q) - len(kept)
            if kept:
                self._queues[key] = kept
            else:
                del self._queues[key]

    async def _run_guarded(self, batch: list[_Item], mixed: bool, swapped: bool) -> None:
        """`_run`, with any failure handed to the batch's callers: the loop never dies."""
        try:
            await self._run(batch, mixed, swapped)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(exc)

    async def _run(self, batch: list[_Item], mixed: bool, swapped: bool) -> None:
        now = time.monotonic()
        try:
            outputs = await self._run_chunks(batch, mixed)
        except Exception:
            if len(batch) == 1:
                raise
            # One bad request must not fail its batch-mates: run each alone.
            for it in batch:
                try:
                    out = await self._run_chunks([it])
                    _resolve(it, out[0], BatchInfo(1, swapped, now - it.enqueued))
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    if not it.future.done():
                        it.future.set_exception(exc)
            return
        for it, out in zip(batch, outputs):
            _resolve(it, out, BatchInfo(len(batch), swapped, now - it.enqueued))

    # ------------------------------------------------------------------ worker thread

    async def _run_chunks(self, batch: list[_Item], mixed: bool = False) -> list[list[Any]]:
        """Run a batch as length-sorted engine calls under the padded-token cap (mixed: with
        each text's own adapter, in one unmerged call per chunk); results per item, per text.

        The calls are planned on a worker (the split is a Python loop over the texts) and run
        on every free worker at once: a batch that arrives while the other workers idle
        spreads over them instead of running its calls one after another on one of them.
        """
        loop = asyncio.get_running_loop()
        free = max(1, self.workers - self._running + 1)  # this batch's worker and the idle ones
        flat, chunks = await loop.run_in_executor(self._executor, self._plan_chunks, batch, free)
        outs = await asyncio.gather(
            *(loop.run_in_executor(self._executor, self._run_call, batch, flat, chunk, mixed) for chunk in chunks)
        )
        results: list[Any] = [None] * len(flat)
        for chunk, out in zip(chunks, outs):
            for k, o in zip(chunk, out):
                results[k] = o
        per_item: list[list[Any]] = [[None] * len(it.texts) for it in batch]
        for k, (i, j, _, _) in enumerate(flat):
            per_item[i][j] = results[k]
        return per_item

    def _plan_chunks(
        self, batch: list[_Item], free: int = 1
    ) -> tuple[list[tuple[int, int, str, int]], list[list[int]]]:
        """(item, text index, text, length) of every text, and the engine calls as lists of its
        indices; an unpadded batch is spread over the `free` workers."""
        flat = [(i, j, text, length) for i, it in enumerate(batch) for j, (text, length) in enumerate(zip(it.texts, it.lengths))]
        order = sorted(range(len(flat)), key=lambda k: flat[k][3])
        length, cap = (lambda k: flat[k][3]), self.config.max_batch_tokens
        if self.unpadded:
            return flat, list(_spread(order, length, free, cap, self._call_overhead))
        return flat, list(_chunks(order, length, cap, self._call_overhead))

    def _run_call(
        self, batch: list[_Item], flat: list[tuple[int, int, str, int]], chunk: list[int], mixed: bool
    ) -> list[Any]:
        """Worker thread: one engine call over the texts `chunk` names; one result per text."""
        texts = [flat[k][2] for k in chunk]
        kinds = [batch[flat[k][0]].kind for k in chunk]
        if mixed:
            adapters = [batch[flat[k][0]].adapter for k in chunk]
            outs = self.runner.run_mixed_batch(kinds, adapters, texts)  # type: ignore[attr-defined]
        else:
            outs = self.runner.run_batch(kinds, batch[0].adapter, texts)
        if len(outs) != len(chunk):
            raise RuntimeError(f"engine returned {len(outs)} results for {len(chunk)} inputs")
        return outs


def _coalesce(delta: Any, queue: asyncio.Queue) -> Any:
    """Fold the deltas already waiting in `queue` into `delta` (text and tokens appended, the
    last finish reason kept), so a consumer that fell behind sends one message, not one per
    token; returns the end marker or error met on the way (None: the stream goes on)."""
    while not queue.empty():
        nxt = queue.get_nowait()
        if nxt is _END or isinstance(nxt, BaseException):
            return nxt
        delta.text += nxt.text
        delta.token_ids = delta.token_ids + nxt.token_ids
        delta.finish_reason = nxt.finish_reason
    return None


def _joined(started: list[tuple[float, int]], enqueued: float) -> BatchInfo:
    """A generation request's BatchInfo: the largest batch a sequence of it joined, and its wait."""
    if not started:
        return BatchInfo(1, False, 0.0)
    return BatchInfo(max(n for _, n in started), False, min(t for t, _ in started) - enqueued)


def _threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn(*args)` on `loop` from another thread (dropped once the loop is closed)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _settle(future: asyncio.Future, out: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(out)


def _resolve(item: _Item, out: Any, info: BatchInfo) -> None:
    if not item.future.done():
        item.future.set_result((out, info))


def _spread(order: list[int], length: Callable[[int], int], workers: int, cap: int, overhead: int) -> Iterator[list[int]]:
    """Unpadded calls for length-sorted indices: one per free engine worker while each still
    gets `overhead` tokens of work (fewer for a small batch: a call's fixed cost buys nothing
    there), cut at equal shares of the tokens so the workers finish together; each part is
    cut again only where `cap` needs it.

    Why: an idle worker would otherwise wait for the next batch while this one runs its
    forwards one after another, and nothing in a batch is answered before its last call. Why
    free workers only: under load the others are busy anyway, and a bigger forward costs less
    per text. Under load one call per batch, the spread over all workers and over the free
    ones measured alike (loadtest/results/overheads.md), so this one is chosen for the idle
    case it speeds up."""
    lengths = [max(length(k), 1) for k in order]
    total = sum(lengths)
    calls = max(1, min(workers, len(order), total // overhead if overhead else workers))
    start, seen, part = 0, 0, 1
    for i, n in enumerate(lengths):
        seen += n
        if part < calls and seen * calls >= total * part:
            yield from _chunks(order[start : i + 1], length, cap, overhead, unpadded=True)
            start, part = i + 1, part + 1
    if start < len(order):
        yield from _chunks(order[start:], length, cap, overhead, unpadded=True)


def _chunks(
    order: list[int], length: Callable[[int], int], cap: int, overhead: int, *, unpadded: bool = False
) -> Iterator[list[int]]:
    """Split length-sorted indices into calls with len(chunk) * longest <= cap (at least one
    text each), the cuts minimising the sum over calls of `overhead` (tokens per call) +
    len(chunk) * longest (`unpadded`: the chunk's own tokens): an O(n^2) dynamic programme
    over contiguous runs, exact because with sorted lengths some optimal split is contiguous."""
    lengths = [max(length(k), 1) for k in order]
    n = len(lengths)
    before = list(itertools.accumulate(lengths, initial=0))  # before[i]: tokens of the first i texts
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest split of the first j texts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # chunk = texts i..j-1, longest = lengths[j-1]
            padded = (j - i) * lengths[j - 1]
            if padded > cap and j - i > 1:
                break
            cost = best[i] + overhead + (before[j] - before[i] if unpadded else padded)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds: list[tuple[int, int]] = []
    j = n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    for i, j in reversed(bounds):
        yield order[i:j]
