"""Which adapters live on this engine and which one is in the weights.

`AdapterResidency` owns the adapter LRU (`AdapterCache`), the pristine weights and the
in-place writes (`WeightBank`), the gate no forward may run without, and the leases
that keep a request's adapters from eviction. Every task runner (encode, generate,
stream) leases through `lease` and runs its forwards inside `merged` or `unmerged`, so
the reference count and the swap bookkeeping each live in one place.

Forwards may run on several threads at once (a replica's engine workers: on a
CPU, N one-thread forwards side by side cost less CPU per text than one forward on N
intra-op threads, whose workers spin between parallel regions). The gate is a
readers-writer rule over the weights: any number of forwards that need the weights in
the same state (the same adapter merged; or the pristine base, which base and mixed
forwards share) run together, and a swap waits until no forward runs. A forward that
needs another state waits for the running ones to end, and forwards of the current state
that arrive after it wait behind it, so a swap is never starved. A mixed forward's
per-row updates are hooks that act only on the thread that installed them
(serving/engine/mixed.py), so concurrent base and mixed forwards do not see each other's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from adapters.bundle import AdapterBundle, Task
from adapters.errors import BundleError
from adapters.validation import BaseModelSpec, check_servable
from serving.engine.adapter_cache import (
    AdapterCache,
    Built,
    CompactTarget,
    PreparedAdapter,
    build_pairs,
    dense_of,
    held_bytes,
    planned_bytes,
    prepare,
)
from serving.engine.mixed import RowStacks, mixed_lora
from serving.engine.outputs import EngineStats, LoadedAdapterInfo
from serving.engine.weights import TargetDelta, WeightBank
from adapters.tasks.errors import AdapterNotLoaded, Overloaded

Entry = PreparedAdapter | None  # None: the base model, no adapter


class AdapterResidency:
    """Loaded adapters of one model, the active one, and every swap; thread-safe.

    One RLock guards the bookkeeping; `_gate` (a condition on it) counts the forwards
    running on the active weights, and `_write` waits until there are none, so no forward
    ever overlaps a swap.
    """

    def __init__(
        self, model: torch.nn.Module, spec: BaseModelSpec, device: torch.device, cache_bytes: int, dense_bytes: int
    ) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self.bank = WeightBank(model)
        self.cache = AdapterCache(cache_bytes, dense_bytes)
        self._lock = threading.RLock()
        self._gate = threading.Condition(self._lock)
        self._forwards = 0  # forwards running now, all on the active weights
        self._waiting = 0  # forwards waiting for another state: later ones queue behind them
        self._active: Entry = None
        self._swaps = self._hits = self._misses = self._evictions = 0
        self._swap_total = self._swap_last = 0.0

    # ------------------------------------------------------------------ load / unload

    def load(self, name: str, bundle: AdapterBundle) -> LoadedAdapterInfo:
        """Validate every target, hold it compact, insert (evicting LRU entries if needed).

        Replaces an entry of the same name; if that one is active, the new one is written.
        Raises BundleError (nothing changed) if the bundle cannot be served here.
        """
        self._validate(name, bundle)  # reads only static facts of the base model
        dense, factors, _head = planned_bytes(bundle)
        held = held_bytes(bundle)
        if held + factors > self.cache.capacity:
            raise BundleError(
                f"needs {held + factors} bytes, more than adapter_cache_bytes={self.cache.capacity}", name=name
            )
        with self._lock:
            mode = self.cache.choose_mode(dense, factors, held, name, self._protected())
        if mode is None:
            raise Overloaded(f"adapter cache is full of active or in-use adapters; cannot load {name!r}")
        # packing and the finiteness check touch no weight: done outside the lock, so forwards go on
        entry = prepare(name, bundle, self.bank, self.device, mode)
        bad = _non_finite_targets(entry.compact, bundle.metadata.scaling)
        if bad:
            raise BundleError([f"target {t!r}: merged delta is not finite" for t in bad], name=name)
        with self._lock:
            # built forms give way first (rebuilt in about a millisecond); then LRU adapters
            old_entry = self.cache.peek(name)
            self.cache.shed_built(entry.nbytes - (old_entry.nbytes if old_entry is not None else 0), self._protected())
            victims = self.cache.victims(entry.nbytes, name, self._protected())
            if victims is None:
                raise Overloaded(f"adapter cache is full of active or in-use adapters; cannot load {name!r}")
            for victim in victims:
                self._evict(victim)
            self.bank.acquire(entry.targets)
            old = self.cache.put(entry)
            self._misses += 1
            if old is not None:
                if self._active is old:
                    self._write(entry)  # from the old state; old-only targets restored from pristine
                self.bank.release(old.targets)
            return _info(entry)

    def _validate(self, name: str, bundle: AdapterBundle) -> None:
        """check_servable plus what the weight bank needs of each target; one error listing all."""
        problems: list[str] = []
        try:
            check_servable(bundle, self.spec)
        except BundleError as exc:
            problems += exc.problems
        if set(bundle.targets) != set(bundle.metadata.targets):
            problems.append("tensors' targets do not match the metadata targets")
        for t in bundle.metadata.targets:
            if t in self.spec.linear_shapes:
                problems += self.bank.problems(t)
        for k, v in bundle.head.items():
            if not v.is_floating_point():
                problems.append(f"head tensor {k!r} is not floating point")
        if problems:
            raise BundleError(problems, name=name)

    def unload(self, name: str) -> None:
        """Drop an adapter; if it is active the base is restored first.

        One still leased (a stream between two of its slices) keeps serving its leases and
        is dropped when the last one ends, so callers never count streams themselves.
        """
        with self._lock:
            entry = self.cache.peek(name)
            if entry is None:
                raise AdapterNotLoaded(name)
            if entry.inflight:
                entry.retiring = True
            else:
                self._drop(entry)

    def _drop(self, entry: PreparedAdapter) -> None:
        if self._active is entry:
            self._write(None)
        self.cache.pop(entry.name)
        self.bank.release(entry.targets)

    def _protected(self) -> set[str]:
        return {self._active.name} if self._active is not None else set()

    def _evict(self, name: str) -> None:
        entry = self.cache.pop(name)
        assert entry is not None and entry is not self._active
        self.bank.release(entry.targets)
        self._evictions += 1

    def _built(self, entry: PreparedAdapter, merged: bool = False) -> Built:
        """`entry`'s built form (made now unless kept; with its dense deltas when `merged`);
        then, if the cache is over its budget, LRU entries other than `entry` and the
        protected ones are evicted. Lock held."""
        if entry.is_built(merged):  # kept: nothing grows, so nothing to evict
            return self.cache.touch_built(entry)
        built = self.cache.build(entry, merged)
        for victim in self.cache.victims(0, None, self._protected() | {entry.name}) or []:
            self._evict(victim)
        return built

    def infos(self) -> list[LoadedAdapterInfo]:
        with self._lock:
            return [_info(e) for e in self.cache.entries()]

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self.cache

    def task_of(self, name: str) -> Task:
        """The task of a loaded adapter (no LRU move: requests check it before leasing)."""
        with self._lock:
            entry = self.cache.peek(name)
        if entry is None:
            raise AdapterNotLoaded(name)
        return entry.task

    # ------------------------------------------------------------------ leases

    def check(self, name: str | None) -> None:
        """Raise AdapterNotLoaded now unless `name` is loaded (counts a cache hit, as a lease does)."""
        with self._lock:
            self._resolve(name, touch=True)

    @contextmanager
    def lease(self, names: Sequence[str | None], *, touch: bool = True) -> Iterator[list[Entry]]:
        """Row i's adapter (each distinct one resolved once), none evictable until the block ends.

        `touch=False` re-resolves names a request already checked (a stream's first step):
        no second cache hit, no LRU move. This is the only place the in-flight count changes.
        """
        with self._lock:
            held = {n: self._resolve(n, touch) for n in dict.fromkeys(names)}
            for e in held.values():
                if e is not None:
                    e.inflight += 1
        try:
            yield [held[n] for n in names]
        finally:
            with self._lock:
                for e in held.values():
                    if e is not None:
                        e.inflight -= 1
                        if not e.inflight and e.retiring and self.cache.peek(e.name) is e:
                            self._drop(e)

    def _resolve(self, name: str | None, touch: bool) -> Entry:
        if name is None:
            return None
        entry = self.cache.touch(name) if touch else self.cache.peek(name)
        if entry is None:
            raise AdapterNotLoaded(name)
        if touch:
            self._hits += 1
        return entry

    def _still_loaded(self, entries: Sequence[Entry]) -> None:
        """A leased entry may have been replaced (same name loaded again) or unloaded since."""
        for e in {id(e): e for e in entries if e is not None}.values():
            if self.cache.peek(e.name) is not e:
                raise AdapterNotLoaded(e.name)

    # ------------------------------------------------------------------ forwards

    @contextmanager
    def merged(self, entry: Entry) -> Iterator[None]:
        """`entry` (None: the base) in the weights, held there while one forward runs."""
        with self._forward_on(entry, [entry]):
            yield

    @contextmanager
    def unmerged(self, entries: Sequence[Entry], stacks: RowStacks | None = None) -> Iterator[None]:
        """The pristine base in the weights (mixed mode runs with NO adapter merged) and row
        i's factor pair hooked in for this thread's forward (`stacks`: a decoder's, see
        serving/engine/mixed.py)."""
        with self._forward_on(None, entries):
            with self._lock:
                built: dict[int, Built] = {}
                for e in entries:  # once per adapter, however many rows use it
                    if e is not None and id(e) not in built:
                        built[id(e)] = self._built(e)
            with mixed_lora(self.model, [built[id(e)].factors if e is not None else None for e in entries], self.device, stacks):
                yield

    @contextmanager
    def _forward_on(self, state: Entry, entries: Sequence[Entry]) -> Iterator[None]:
        """Enter the gate with the weights in `state`: join the forwards running on it, or
        wait until none runs and swap; leave when the forward is done."""
        with self._gate:
            queued = False
            try:
                while True:
                    self._still_loaded(entries)
                    if queued or not self._waiting:  # waiters go before newcomers
                        if self._active is state:
                            break
                        if self._forwards == 0:
                            self._write(state)
                            break
                    if not queued:
                        queued = True
                        self._waiting += 1
                    self._gate.wait()
            finally:
                if queued:
                    self._waiting -= 1
            self._forwards += 1
        try:
            yield
        finally:
            with self._gate:
                self._forwards -= 1
                self._gate.notify_all()

    def activate(self, name: str | None) -> bool:
        """Make `name` (None: the base) the weights in place; True when weights were rewritten."""
        with self._lock:
            return self._write(self._resolve(name, touch=True))

    def _write(self, entry: Entry) -> bool:
        """Swap from the active entry to `entry` once no forward runs: check every target,
        then rewrite in place. Called with the lock held."""
        if self._active is not entry and self._forwards:
            self._waiting += 1  # forwards arriving meanwhile queue behind this swap
            try:
                while self._active is not entry and self._forwards:
                    self._gate.wait()
            finally:
                self._waiting -= 1
        old = self._active
        if entry is old:
            return False
        start = time.perf_counter()  # the swap's time includes building the form it writes
        changes: dict[str, TargetDelta | None] = dict.fromkeys(old.targets if old is not None else ())
        if entry is not None:
            changes.update(self._built(entry, merged=True).deltas)
        problems = [p for t, d in changes.items() for p in self.bank.check(t, d)]
        if problems:
            raise RuntimeError("refusing to swap, nothing written: " + "; ".join(problems))
        self.bank.write(changes)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._swap_last = time.perf_counter() - start
        self._swap_total += self._swap_last
        self._swaps += 1
        self._active = entry
        self._gate.notify_all()  # forwards queued for this state may join now
        return True

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                active_adapter=self._active.name if self._active is not None else None,
                swaps=self._swaps,
                swap_seconds_total=self._swap_total,
                last_swap_seconds=self._swap_last,
                cache_hits=self._hits,
                cache_misses=self._misses,
                cache_evictions=self._evictions,
                cache_bytes=self.cache.nbytes,
                loaded_adapters=len(self.cache),
            )


def _non_finite_targets(compact: dict[str, CompactTarget], scaling: float) -> list[str]:
    """Targets whose stacked pair or product B'A' is not finite (all pairs built in one
    `build_pairs` call). The product is only computed when the cheap bound (largest |B'| x
    largest |A'| x d*r) does not rule out overflow."""
    pairs = build_pairs(compact, scaling)
    bad = []
    for target in compact:  # in the bundle's order, as the error lists them
        pair = pairs[target]
        assert pair.b is not None and pair.a is not None
        if not (bool(torch.isfinite(pair.b).all()) and bool(torch.isfinite(pair.a).all())):
            bad.append(target)
            continue
        bound = float(pair.b.abs().max()) * float(pair.a.abs().max()) * pair.a.shape[0]
        if bound >= torch.finfo(torch.float32).max / 2 and not bool(
            torch.isfinite(dense_of(pair, compact[target].transposed).dense).all()  # type: ignore[arg-type]
        ):
            bad.append(target)
    return bad


def _info(e: PreparedAdapter) -> LoadedAdapterInfo:
    return LoadedAdapterInfo(name=e.name, task=e.task, mode=e.mode, nbytes=e.nbytes, labels=e.metadata.labels)
