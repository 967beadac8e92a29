"""The engine: one base model, many CapaBoost adapters merged into it in place, one lock.

Small verb set: load / unload / pin / list / activate, plus the task calls (embed,
classify, generate, generate_stream). No forward ever overlaps a swap: every
activate+forward pair runs under one RLock; generation takes it per decode step and
re-activates its own adapter each step, so interleaved requests of different adapters
stay correct. No Ray in here: the Ray Serve deployment is a shim over this class.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch

from adapters.bundle import AdapterBundle, Task
from adapters.errors import BundleError
from adapters.validation import check_servable
from serving.engine.adapter_cache import AdapterCache, PreparedAdapter, planned_bytes, prepare
from serving.engine.config import EngineConfig, SamplingParams
from serving.engine.errors import AdapterNotLoaded
from serving.engine.generation import BatchDecoder, SequenceState
from serving.engine.mixed import adapter_order, mixed_lora
from serving.engine.model_loader import LoadedModel, load_model
from serving.engine.outputs import (
    ClassificationOutput,
    EmbeddingOutput,
    EncodedRow,
    EncodeTask,
    EngineStats,
    GenerationDelta,
    GenerationOutput,
    LoadedAdapterInfo,
)
from serving.engine.pooling import classification_head, l2_normalize, mean_pool, pool
from serving.engine.weights import WeightBank
from serving.errors import InvalidRequest, Overloaded, UnsupportedTask

#: Texts per encoder forward; the lock is released between chunks.
ENCODE_CHUNK = 64

#: merged: the batch's one adapter is written into the weights; mixed: base weights, per-row updates.
AdapterMode = Literal["merged", "mixed"]


class Engine:
    """Serves the base model and its loaded adapters; thread-safe."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self._setup(config, load_model(config))

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, config: EngineConfig | None = None) -> "Engine":
        """An engine over an already built model (benchmarks on random models built in memory)."""
        self = cls.__new__(cls)
        config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self._setup(config, loaded)
        return self

    def _setup(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.task: Task = loaded.task
        self.spec = loaded.spec
        self.model_id: str = loaded.spec.model_id
        self.device: torch.device = loaded.device
        self.dtype: torch.dtype = loaded.dtype
        self.max_len = min(config.max_seq_len, loaded.max_positions)
        self._bank = WeightBank(self.model)
        self._cache = AdapterCache(config.adapter_cache_bytes, config.dense_budget_bytes)
        self._lock = threading.RLock()
        # fast tokenizers may reconfigure their Rust state on a call: never two at once
        self._tok_lock = threading.Lock()
        self._active: PreparedAdapter | None = None
        self._mode: AdapterMode = "merged"
        self._swaps = self._hits = self._misses = self._evictions = 0
        self._swap_total = self._swap_last = 0.0
        self._eos_ids = self._collect_eos()

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, name: str, bundle: AdapterBundle) -> LoadedAdapterInfo:
        """Validate every target, pre-merge once, insert (evicting LRU entries if needed).

        Replaces an entry of the same name; if that one is active, the new one is written.
        Raises BundleError (nothing changed) if the bundle cannot be served here.
        """
        self._validate(name, bundle)  # reads only static facts of the base model
        dense, factors, head = planned_bytes(bundle)
        if factors + head > self._cache.capacity:
            raise BundleError(
                f"needs {factors + head} bytes, more than adapter_cache_bytes={self._cache.capacity}", name=name
            )
        with self._lock:
            mode = self._cache.choose_mode(dense, factors, head, name, self._protected())
        if mode is None:
            raise Overloaded(f"adapter cache is full of active, pinned or in-use adapters; cannot load {name!r}")
        # pre-merging touches no weight: done outside the lock, so forwards go on meanwhile
        entry = prepare(name, bundle, self._bank, self.device, mode)
        bad = [t for t, d in entry.deltas.items() if d.dense is not None and not bool(torch.isfinite(d.dense).all())]
        if bad:
            raise BundleError([f"target {t!r}: merged delta is not finite" for t in bad], name=name)
        with self._lock:
            victims = self._cache.victims(entry.nbytes, name, self._protected())
            if victims is None:
                raise Overloaded(f"adapter cache is full of active, pinned or in-use adapters; cannot load {name!r}")
            for victim in victims:
                self._evict(victim)
            self._bank.acquire(list(entry.deltas))
            old = self._cache.put(entry)
            self._misses += 1
            if old is not None:
                if self._active is old:
                    self._write(entry)  # from the old state; old-only targets restored from pristine
                self._bank.release(list(old.deltas))
            return self._info(entry)

    def _protected(self) -> set[str]:
        return {self._active.name} if self._active is not None else set()

    def _validate(self, name: str, bundle: AdapterBundle) -> None:
        """check_servable plus what this engine needs of each target; one error listing all."""
        problems: list[str] = []
        try:
            check_servable(bundle, self.spec)
        except BundleError as exc:
            problems += exc.problems
        if set(bundle.targets) != set(bundle.metadata.targets):
            problems.append("tensors' targets do not match the metadata targets")
        for t in bundle.metadata.targets:
            if t in self.spec.linear_shapes:
                problems += self._bank.problems(t)
        for k, v in bundle.head.items():
            if not v.is_floating_point():
                problems.append(f"head tensor {k!r} is not floating point")
        if problems:
            raise BundleError(problems, name=name)

    def unload_adapter(self, name: str) -> None:
        """Drop an adapter; if it is active the base is restored first."""
        with self._lock:
            entry = self._cache.peek(name)
            if entry is None:
                raise AdapterNotLoaded(name)
            if self._active is entry:
                self._write(None)
            self._cache.pop(name)
            self._bank.release(list(entry.deltas))

    def pin_adapter(self, name: str, pinned: bool = True) -> None:
        """Pinned adapters are never evicted by the LRU."""
        with self._lock:
            entry = self._cache.peek(name)
            if entry is None:
                raise AdapterNotLoaded(name)
            entry.pinned = pinned

    def list_adapters(self) -> list[LoadedAdapterInfo]:
        with self._lock:
            return [self._info(e) for e in self._cache.entries()]

    def has_adapter(self, name: str) -> bool:
        with self._lock:
            return name in self._cache

    def activate(self, name: str | None) -> bool:
        """Make `name` (None: the base) the weights in place; True when weights were rewritten."""
        with self._lock:
            return self._write(self._lookup(name))

    def _lookup(self, name: str | None) -> PreparedAdapter | None:
        if name is None:
            return None
        entry = self._cache.touch(name)
        if entry is None:
            raise AdapterNotLoaded(name)
        self._hits += 1
        return entry

    def _evict(self, name: str) -> None:
        entry = self._cache.pop(name)
        assert entry is not None and entry is not self._active
        self._bank.release(list(entry.deltas))
        self._evictions += 1

    def _write(self, entry: PreparedAdapter | None) -> bool:
        """Swap from the active entry to `entry`: check every target, then rewrite in place."""
        old = self._active
        if entry is old:
            return False
        changes: dict[str, Any] = dict.fromkeys(old.deltas if old is not None else ())
        if entry is not None:
            changes.update(entry.deltas)
        problems = [p for t, d in changes.items() for p in self._bank.check(t, d)]
        if problems:
            raise RuntimeError("refusing to swap, nothing written: " + "; ".join(problems))
        start = time.perf_counter()
        self._bank.write(changes)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._swap_last = time.perf_counter() - start
        self._swap_total += self._swap_last
        self._swaps += 1
        self._active = entry
        return True

    def _info(self, e: PreparedAdapter) -> LoadedAdapterInfo:
        return LoadedAdapterInfo(
            name=e.name, task=e.task, mode=e.mode, nbytes=e.nbytes, pinned=e.pinned, labels=e.metadata.labels
        )

    @contextmanager
    def _using(self, name: str | None) -> Iterator[PreparedAdapter | None]:
        """Resolve an adapter for one request and keep it from being evicted meanwhile."""
        with self._lock:
            entry = self._lookup(name)
            if entry is not None:
                entry.inflight += 1
        try:
            yield entry
        finally:
            if entry is not None:
                with self._lock:
                    entry.inflight -= 1

    def _ensure(self, entry: PreparedAdapter | None) -> None:
        """(Re)activate a request's adapter before its forward; lock held by the caller."""
        if entry is not None and self._cache.peek(entry.name) is not entry:
            raise AdapterNotLoaded(entry.name)
        self._write(entry)

    # ------------------------------------------------------------------ encoders

    def _encode(self, texts: list[str]) -> tuple[Any, int]:
        if not isinstance(texts, list) or not texts:
            raise InvalidRequest("input must be a non-empty list of strings")
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequest("every input must be a string")
        with self._tok_lock:
            enc = self.tokenizer(texts, add_special_tokens=True)
        lengths = [len(ids) for ids in enc["input_ids"]]
        too_long = [(i, n) for i, n in enumerate(lengths) if n > self.max_len]
        if too_long:
            i, n = too_long[0]
            raise InvalidRequest(f"input {i} has {n} tokens, more than the limit of {self.max_len}")
        return enc, sum(lengths)

    def _hidden_states(
        self, enc: Any, entries: list[PreparedAdapter | None], mixed: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        """Per chunk: last hidden states, masks and the input rows they hold, each forward under the lock.

        Merged: entries[0] (one adapter for all rows) is written into the weights. Mixed: the
        pristine base runs with each row's own factor pair added by hooks; a chunk's rows go
        in adapter order, so each adapter's rows are one slice of the batch (same padding).
        """
        n = len(enc["input_ids"])
        for lo in range(0, n, ENCODE_CHUNK):
            rows = list(range(lo, min(n, lo + ENCODE_CHUNK)))
            if mixed:
                rows = [rows[k] for k in adapter_order([id(entries[i]) for i in rows])]
            with self._tok_lock:
                batch = self.tokenizer.pad({k: [v[i] for i in rows] for k, v in enc.items()}, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self._lock:
                if mixed:
                    updates = self._mixed_updates([entries[i] for i in rows])
                else:
                    self._ensure(entries[0])
                    updates = nullcontext()
                self._mode = "mixed" if mixed else "merged"
                with torch.inference_mode(), updates:
                    hidden = self.model(**batch).last_hidden_state
            yield hidden, batch["attention_mask"], rows

    def _require_encoder(self, what: str) -> None:
        if self.task is Task.CAUSAL_LM:
            raise UnsupportedTask(f"{what} needs an encoder base model; {self.model_id!r} is a causal LM")

    def _check_classifiers(self, names: list[str | None]) -> None:
        """Every classify row needs a loaded sequence-classification adapter (checked before tokenizing)."""
        with self._lock:
            for name in dict.fromkeys(names):
                if name is None:
                    raise UnsupportedTask("classification needs a sequence-classification adapter, not the base model")
                found = self._cache.peek(name)
                if found is None:
                    raise AdapterNotLoaded(name)
                if found.task is not Task.SEQUENCE_CLASSIFICATION:
                    raise UnsupportedTask(f"adapter {name!r} is a {found.task.value} adapter, not sequence-classification")

    def encode(
        self, texts: list[str], adapters: list[str | None], tasks: list[EncodeTask], *, mixed: bool = False
    ) -> list[EncodedRow]:
        """One encoder pass over rows that may mix embeddings and classification.

        Row i uses adapters[i] (None: the base) and gets tasks[i]: a mean-pooled,
        L2-normalised embedding, or the softmax of its adapter's head. Merged (the
        default) needs one adapter for all rows, written into the weights; mixed=True
        runs the rows unmerged on the pristine base, each with its own adapter. Either
        way every row costs one forward shared with the others: endpoints do not split
        a batch.
        """
        self._require_encoder("classification" if isinstance(tasks, list) and "embed" not in tasks else "embeddings")
        if not isinstance(texts, list) or not texts:
            raise InvalidRequest("input must be a non-empty list of strings")
        self._check_rows(texts, adapters)
        if not isinstance(tasks, list) or len(tasks) != len(texts) or any(t not in ("embed", "classify") for t in tasks):
            raise InvalidRequest("tasks must be a list with one entry (embed or classify) per text")
        if not mixed and len(set(adapters)) > 1:
            raise InvalidRequest("a merged encoder batch holds one adapter; pass mixed=True for several")
        self._check_classifiers([a for a, t in zip(adapters, tasks) if t == "classify"])
        enc, _ = self._encode(texts)
        out: list[EncodedRow | None] = [None] * len(texts)
        ids = enc["input_ids"]
        with self._rows_of(adapters, mixed) as entries:
            for hidden, mask, rows in self._hidden_states(enc, entries, mixed):
                pooled = self._rows_out(hidden, mask, [entries[i] for i in rows], [tasks[i] for i in rows],
                                        [ids[i] for i in rows])
                for i, row in zip(rows, pooled):
                    out[i] = row
        return out  # type: ignore[return-value] - every row was filled

    @contextmanager
    def _rows_of(self, names: list[str | None], mixed: bool) -> Iterator[list[PreparedAdapter | None]]:
        if mixed:
            with self._using_many(names) as entries:
                yield entries
        else:
            with self._using(names[0] if names else None) as entry:
                yield [entry] * len(names)

    @staticmethod
    def _rows_out(
        hidden: torch.Tensor,
        mask: torch.Tensor,
        entries: list[PreparedAdapter | None],
        tasks: list[EncodeTask],
        ids: list[list[int]],
    ) -> list[EncodedRow]:
        """Pool one chunk: embed rows together, classify rows per adapter (its pooling and head)."""
        rows: list[EncodedRow | None] = [None] * len(tasks)
        groups: dict[Any, list[int]] = {}
        for k, (task, e) in enumerate(zip(tasks, entries)):
            groups.setdefault("embed" if task == "embed" else id(e), []).append(k)
        for key, ks in groups.items():
            if len(ks) == len(tasks):
                h, m = hidden, mask
            else:
                idx = torch.tensor(ks, device=hidden.device)
                h, m = hidden.index_select(0, idx), mask.index_select(0, idx)
            if key == "embed":
                for k, v in zip(ks, l2_normalize(mean_pool(h, m)).cpu()):
                    rows[k] = EncodedRow(task="embed", prompt_tokens=len(ids[k]), embedding=v)
                continue
            e = entries[ks[0]]
            assert e is not None
            names = list(e.metadata.labels or [])
            probs = torch.softmax(classification_head(pool(h, m, e.metadata.pooling or "mean"), e.head), dim=-1).cpu()
            for k, p in zip(ks, probs):
                rows[k] = EncodedRow(
                    task="classify", prompt_tokens=len(ids[k]), label=names[int(p.argmax())], probs=p, label_names=names
                )
        return [r for r in rows if r is not None]

    def embed(self, texts: list[str], adapter: str | None = None) -> EmbeddingOutput:
        """Mean-pooled, L2-normalised embeddings of the base or of an adapter."""
        rows = self.encode(texts, [adapter] * _count(texts), ["embed"] * _count(texts))
        return _embedding_output(rows)

    def classify(self, texts: list[str], adapter: str) -> ClassificationOutput:
        """Softmax over the labels of a sequence-classification adapter's head."""
        rows = self.encode(texts, [adapter] * _count(texts), ["classify"] * _count(texts))
        return _classification_output(rows)

    # ------------------------------------------------------------------ mixed-adapter batches

    @property
    def mode(self) -> AdapterMode:
        """How the last encoder forward ran: merged (one adapter in the weights) or mixed."""
        return self._mode

    @contextmanager
    def _using_many(self, names: list[str | None]) -> Iterator[list[PreparedAdapter | None]]:
        """Resolve each row's adapter (each distinct one once) and keep them from eviction."""
        with self._lock:
            distinct = {n: self._lookup(n) for n in dict.fromkeys(names)}
            for e in distinct.values():
                if e is not None:
                    e.inflight += 1
        try:
            yield [distinct[n] for n in names]
        finally:
            with self._lock:
                for e in distinct.values():
                    if e is not None:
                        e.inflight -= 1

    def _mixed_updates(self, entries: list[PreparedAdapter | None]) -> Any:
        """Under the lock: the pristine base with row i's factor pair hooked in, as a context.

        Raises AdapterNotLoaded if an entry left the cache since it was pinned.
        """
        for e in {id(e): e for e in entries if e is not None}.values():
            if self._cache.peek(e.name) is not e:
                raise AdapterNotLoaded(e.name)
        self._write(None)  # mixed mode runs with NO adapter merged
        return mixed_lora(self.model, [e.factors if e is not None else None for e in entries], self.device)

    def _check_rows(self, texts: list[str], adapters: list[str | None]) -> None:
        if not isinstance(adapters, list) or not isinstance(texts, list) or len(adapters) != len(texts):
            raise InvalidRequest("adapters must be a list with one entry (a name or None) per text")

    def embed_mixed(self, texts: list[str], adapters: list[str | None]) -> EmbeddingOutput:
        """Embeddings of a batch whose row i uses adapters[i] (None: the base), in one forward."""
        return _embedding_output(self.encode(texts, adapters, ["embed"] * _count(adapters), mixed=True))

    def classify_mixed(self, texts: list[str], adapters: list[str]) -> list[ClassificationOutput]:
        """Row i classified by adapters[i] (its own head, pooling and labels); one output per row."""
        rows = self.encode(texts, list(adapters), ["classify"] * _count(adapters), mixed=True)
        return [_classification_output([r]) for r in rows]

    # ------------------------------------------------------------------ causal LMs

    def _collect_eos(self) -> set[int]:
        ids: set[int] = set()
        tok_eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        gen_cfg = getattr(self.model, "generation_config", None)
        for v in (tok_eos, getattr(gen_cfg, "eos_token_id", None)):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
        return ids

    def _prompt_ids(self, prompts: list[str], params: SamplingParams) -> list[list[int]]:
        if self.task is not Task.CAUSAL_LM:
            raise UnsupportedTask(f"text generation needs a causal LM; {self.model_id!r} is an encoder")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidRequest("prompt must be a non-empty list of strings")
        with self._tok_lock:
            encoded = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        out: list[list[int]] = []
        for i, ids in enumerate(encoded):
            if not ids:
                bos = self.tokenizer.bos_token_id
                if bos is None:
                    raise InvalidRequest(f"prompt {i} is empty")
                ids = [bos]
            if len(ids) + params.max_tokens > self.max_len:
                raise InvalidRequest(
                    f"prompt {i} has {len(ids)} tokens; with max_tokens={params.max_tokens} it exceeds "
                    f"the limit of {self.max_len} tokens"
                )
            out.append(list(ids))
        return out

    def _decoder(self, ids: list[list[int]], params: SamplingParams) -> tuple[BatchDecoder, list[SequenceState]]:
        dec = BatchDecoder(self.model, ids, int(self.tokenizer.pad_token_id), params, self.device)
        states = [SequenceState(self.tokenizer, len(p), params, self._eos_ids) for p in ids]
        return dec, states

    def _step(self, dec: BatchDecoder, entry: PreparedAdapter | None) -> list[int]:
        with self._lock:
            self._ensure(entry)
            return dec.step()

    def generate(self, prompts: list[str], adapter: str | None, params: SamplingParams) -> list[GenerationOutput]:
        """Complete a batch of prompts for one adapter (left-padded, KV cache, one lock per step)."""
        ids = self._prompt_ids(prompts, params)
        with self._using(adapter) as entry:
            dec, states = self._decoder(ids, params)
            while not all(s.done for s in states):
                for s, tok in zip(states, self._step(dec, entry)):
                    if not s.done:
                        s.push(tok)
        return [s.output() for s in states]

    def generate_mixed(
        self, prompts: list[str], adapters: list[str | None], params: SamplingParams
    ) -> list[GenerationOutput]:
        """Complete a batch whose row i uses adapters[i] (None: the base), unmerged.

        The decoder's rows stay fixed for the whole generation (finished rows keep being
        computed), so each step installs the same per-row updates and every row's KV cache
        is its own adapter's. Greedy rows equal their merged single-adapter completion;
        sampled rows share one generator, as in `generate`.
        """
        self._check_rows(prompts, adapters)
        ids = self._prompt_ids(prompts, params)  # errors name rows as the caller numbered them
        order = adapter_order(list(adapters))  # each adapter's rows one slice of the batch
        outputs = self._generate_mixed([ids[i] for i in order], [adapters[i] for i in order], params)
        restored: list[GenerationOutput | None] = [None] * len(order)
        for i, o in zip(order, outputs):
            restored[i] = o
        return restored  # type: ignore[return-value] - every row was filled

    def _generate_mixed(
        self, ids: list[list[int]], adapters: list[str | None], params: SamplingParams
    ) -> list[GenerationOutput]:
        with self._using_many(adapters) as entries:
            dec, states = self._decoder(ids, params)
            while not all(s.done for s in states):
                with self._lock, self._mixed_updates(entries):
                    toks = dec.step()
                for s, tok in zip(states, toks):
                    if not s.done:
                        s.push(tok)
        return [s.output() for s in states]

    def generate_stream(self, prompt: str, adapter: str | None, params: SamplingParams) -> Iterator[GenerationDelta]:
        """Deltas of one completion; the last one has finish_reason set. Bad requests raise
        here, before the first delta, so a server can answer with an error status."""
        ids = self._prompt_ids([prompt], params)
        with self._lock:
            self._lookup(adapter)
        return self._stream(ids, adapter, params)

    def _stream(self, ids: list[list[int]], adapter: str | None, params: SamplingParams) -> Iterator[GenerationDelta]:
        with self._lock:  # resolved again: it may have gone since generate_stream returned
            entry = self._cache.peek(adapter) if adapter is not None else None
            if adapter is not None and entry is None:
                raise AdapterNotLoaded(adapter)
            if entry is not None:
                entry.inflight += 1
        try:
            dec, (state,) = self._decoder(ids, params)
            while not state.done:
                state.push(self._step(dec, entry)[0])
                delta = state.take_delta()
                if delta.text or delta.finish_reason is not None or delta.token_ids:
                    yield delta
        finally:
            if entry is not None:
                with self._lock:
                    entry.inflight -= 1

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for chat messages, ending with the assistant turn's opening."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise UnsupportedTask(f"model {self.model_id!r} has no chat template")
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise InvalidRequest("messages must be a non-empty list of {role, content} objects")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, texts: list[str]) -> int:
        with self._tok_lock:
            encoded = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        return sum(len(ids) for ids in encoded)

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
                cache_bytes=self._cache.nbytes,
                loaded_adapters=len(self._cache),
            )


def _count(xs: Any) -> int:
    """Rows of a list argument (0 for anything else, which `encode` then rejects)."""
    return len(xs) if isinstance(xs, list) else 0


def _embedding_output(rows: list[EncodedRow]) -> EmbeddingOutput:
    return EmbeddingOutput(
        embeddings=torch.stack([r.embedding for r in rows]), prompt_tokens=sum(r.prompt_tokens for r in rows)
    )


def _classification_output(rows: list[EncodedRow]) -> ClassificationOutput:
    return ClassificationOutput(
        labels=[r.label for r in rows],
        probs=torch.stack([r.probs for r in rows]),
        label_names=list(rows[0].label_names or []),
        prompt_tokens=sum(r.prompt_tokens for r in rows),
    )
