"""Continuous (iteration-level) batching for generation: sequences join the running batch at
the next decode step and leave the step they finish.

Why: a batch that runs until its longest member ends admits nobody meanwhile, so with
varied lengths a replica decodes nearly one sequence at a time. Here one decode loop (its own
thread, alive while generation requests exist) runs, per iteration:

1. Drop the rows whose consumer went away (a closed stream): freed before the next forward.
2. Admit waiting sequences in arrival order while the KV budget holds them (below).
3. One prefill forward for admitted sequences: several short prompts together (left-padded),
   or one chunk of `prefill_chunk_tokens` of a long prompt, so a long prompt delays the
   others' next token by one chunk, never by its whole prefill. A prefilled sequence samples
   its first token at once (streamed at once: time to first token) and joins the batch.
4. One decode forward for every running row (those just prefilled included): each row
   samples with its own parameters (temperature, top_p, its own seeded generator), and a row
   that finishes (max_tokens, a stop string, EOS) leaves the batch at once: its KV rows are
   dropped. A stream gets its first token and its end at once and its text in between at most
   every `stream_interval_s` (each message costs the replica's event loop, which shares the
   GIL with this thread).

KV cache: one batched transformers `DynamicCache`, rows left-padded to the longest row, with
an attention mask and per-row position ids, so each row is computed as if it were alone (up
to float rounding of the matrix shapes). Joining pads the shorter side on the left and
concatenates; leaving selects the remaining rows and cuts the columns every row pads. A
cache per row (one forward per row) would give up the batching this is for; transformers'
paged continuous batching owns its own forward loop and cannot pick weights per step.

Memory budget: the padded cache holds at most rows x longest reservation, a sequence's
reservation being prompt + max_tokens tokens. A sequence is admitted only while
(rows + 1) x longest reservation x bytes per token fits `kv_cache_bytes`; otherwise it waits
in the queue (whose bound answers 503). One that could not fit even alone is refused (400).

Adapters per iteration: when every row (running and prefilling) uses one adapter or the base,
both forwards run on merged weights (no overhead); when several are present, both run on the
pristine weights with each row's exact rank-(d*r) update added (serving/engine/mixed.py). The
state is chosen per forward inside the engine's gate, so a swap never happens inside a
forward and no row ever runs with another adapter's weights. Each sequence leases its adapter
from admission to its end (no eviction meanwhile).
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers.cache_utils import DynamicLayer

from adapters.tasks.errors import InvalidRequest
from serving.engine.decoding import GREEDY_BELOW, SequenceState, make_generator, next_tokens
from serving.engine.mixed import RowStacks
from serving.engine.outputs import GenerationDelta, GenerationOutput
from serving.engine.residency import AdapterResidency, Entry
from serving.engine.sampling import SamplingParams

T = TypeVar("T")
Guard = Callable[[list[str | None], Callable[[], T]], T]


@dataclass
class GenSequence:
    """One prompt to complete, and where its results go (callbacks run on the loop thread)."""

    ids: list[int]
    adapter: str | None
    params: SamplingParams
    on_delta: Callable[[GenerationDelta], None] | None  # streams only
    on_done: Callable[[GenerationOutput | None, BaseException | None], None]
    on_start: Callable[[int], None] | None = None  # with the batch size it joined
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def reserve(self) -> int:
        """KV tokens this sequence may hold at most."""
        return len(self.ids) + self.params.max_tokens


@dataclass
class _Row:
    seq: GenSequence
    entry: Entry
    state: SequenceState
    generator: torch.Generator | None
    stack: ExitStack
    filled: int = 0  # prompt tokens already in the cache
    cache: Any = None  # its own cache while its prompt is prefilled in chunks
    last: int = 0  # the token the next decode step feeds
    sent_at: float | None = None  # when its stream last got a delta (None: not yet)


class ContinuousDecoder:
    """The batch and its cache; every method runs on the decode loop's thread."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        residency: AdapterResidency,
        eos_ids: set[int],
        kv_cache_bytes: int,
        max_rows: int,
        prefill_tokens: int,
        guard: Guard | None = None,
        stream_interval_s: float = 0.0,
    ) -> None:
        self.model = model
        self.tok = tokenizer
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.residency = residency
        self.device = residency.device
        self.eos_ids = eos_ids
        self.budget = kv_cache_bytes
        self.max_rows = max_rows
        self.prefill_tokens = max(1, prefill_tokens)
        self.guard: Guard = guard or (lambda refs, fn: fn())
        self.stream_interval = stream_interval_s
        self.bytes_per_token = kv_bytes_per_token(model)
        self._kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.rows: list[_Row] = []  # decoding, in cache order
        self.prefilling: deque[_Row] = deque()
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, width]
        self._lengths: list[int] = []  # tokens of each row in the cache
        self._stacks = RowStacks()  # the decode batch's stacked factor pairs (unmerged steps)
        self.cancelled = 0  # sequences dropped because their consumer left
        self.peers: list[ContinuousDecoder] = [self]  # decoders sharing the weights (DecodeLoop)

    # ------------------------------------------------------------------ admission

    @property
    def active(self) -> int:
        return len(self.rows) + len(self.prefilling)

    def check(self, seq: GenSequence) -> None:
        """Refuse (400) a sequence that could not fit the budget even alone."""
        need = seq.reserve * self.bytes_per_token
        if need > self.budget:
            raise InvalidRequest(
                f"prompt plus max_tokens needs {need} bytes of KV cache, more than one decode loop's share of "
                f"kv_cache_bytes ({self.budget} bytes)"
            )

    def fits(self, seq: GenSequence) -> bool:
        """Whether the padded cache can hold `seq` beside the admitted sequences."""
        reserves = [r.seq.reserve for r in self.rows] + [r.seq.reserve for r in self.prefilling]
        if len(reserves) >= self.max_rows:
            return False
        return (len(reserves) + 1) * max(reserves + [seq.reserve]) * self.bytes_per_token <= self.budget

    def admit(self, seq: GenSequence) -> None:
        """Lease the sequence's adapter and queue it for prefill (raises if it is gone)."""
        stack = ExitStack()
        try:
            (entry,) = self.guard([seq.adapter], lambda: stack.enter_context(self.residency.lease([seq.adapter])))
        except BaseException:
            stack.close()
            raise
        p = seq.params
        gen = make_generator(self.device, p.seed) if p.temperature >= GREEDY_BELOW else None
        self.prefilling.append(_Row(seq, entry, SequenceState(self.tok, len(seq.ids), p, self.eos_ids), gen, stack))
        if seq.on_start is not None:
            seq.on_start(self.active)

    # ------------------------------------------------------------------ one iteration

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled rows, one prefill forward, one decode forward."""
        self._drop([i for i, r in enumerate(self.rows) if r.seq.cancelled.is_set()], cancelled=True)
        for r in [r for r in self.prefilling if r.seq.cancelled.is_set()]:
            self.prefilling.remove(r)
            self._end(r, cancelled=True)
        prefill = self._prefill_rows()
        merged = len(self._entries(prefill)) <= 1
        if prefill:  # first: a prompt's first token comes out one step sooner, and it decodes in this step
            self._prefill(prefill, merged)
        if self.rows:
            self._decode(merged)

    def _entries(self, prefill: list[_Row]) -> set[int]:
        """The adapters of this step's rows and of the rows other decoders run meanwhile: merged
        only when they all share one, so decoders on other threads never swap against each other."""
        ids = {id(r.entry) for r in self.rows + prefill}
        for d in self.peers:
            if d is not self:
                ids.update(id(r.entry) for r in list(d.rows) + list(d.prefilling))
        return ids

    def _forward(self, rows: list[_Row], merged: bool, stacks: RowStacks | None = None, **inputs: Any) -> Any:
        """One forward of `rows`; unmerged with `stacks` (the decode batch's) or per adapter group."""
        if merged:
            ctx = self.residency.merged(rows[0].entry)
        else:
            ctx = self.residency.unmerged([r.entry for r in rows], stacks)
        with ctx:
            return self.model(**inputs, use_cache=True, **self._kw)

    def _decode(self, merged: bool) -> None:
        assert self._mask is not None
        n = len(self.rows)
        ids = torch.tensor([[r.last] for r in self.rows], dtype=torch.long, device=self.device)
        pos = torch.tensor(self._lengths, dtype=torch.long, device=self.device).unsqueeze(-1)
        self._mask = torch.cat([self._mask, self._mask.new_ones((n, 1))], dim=-1)
        cap = max(r.seq.reserve for r in self.rows)
        for layer in self._cache.layers:
            layer.cap = cap  # SlackLayer: its slack never passes what the KV budget counts
        out = self._forward(
            self.rows, merged, self._stacks,
            input_ids=ids, attention_mask=self._mask, position_ids=pos, past_key_values=self._cache,
        )
        self._cache = out.past_key_values
        self._lengths = [x + 1 for x in self._lengths]
        toks = self._sample(self.rows, out.logits[:, -1, :])
        self._drop([i for i, (r, t) in enumerate(zip(self.rows, toks)) if self._push(r, t)])

    def _prefill_rows(self) -> list[_Row]:
        """Whole short prompts together (padded size within the chunk), or one long prompt's next chunk."""
        if not self.prefilling:
            return []
        head = self.prefilling[0]
        if head.filled or len(head.seq.ids) > self.prefill_tokens:
            return [head]
        rows = [head]
        for r in list(self.prefilling)[1:]:
            width = max(len(x.seq.ids) for x in rows + [r])
            if r.filled or (len(rows) + 1) * width > self.prefill_tokens:
                break
            rows.append(r)
        return rows

    def _prefill(self, rows: list[_Row], merged: bool) -> None:
        if len(rows) == 1 and (rows[0].filled or len(rows[0].seq.ids) > self.prefill_tokens):
            r = rows[0]
            chunk = r.seq.ids[r.filled : r.filled + self.prefill_tokens]
            end = r.filled + len(chunk)
            out = self._forward(
                rows, merged,
                input_ids=torch.tensor([chunk], dtype=torch.long, device=self.device),
                attention_mask=torch.ones((1, end), dtype=torch.long, device=self.device),
                position_ids=torch.arange(r.filled, end, device=self.device).unsqueeze(0),
                past_key_values=r.cache,
            )
            r.cache, r.filled = out.past_key_values, end
            if end < len(r.seq.ids):
                return  # more chunks in the next iterations
            cache, mask = r.cache, torch.ones((1, end), dtype=torch.long, device=self.device)
            r.cache = None
        else:
            width = max(len(r.seq.ids) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, width - len(r.seq.ids) :] = torch.tensor(r.seq.ids, dtype=torch.long)
                mask[i, width - len(r.seq.ids) :] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self._forward(rows, merged, input_ids=ids, attention_mask=mask, position_ids=pos)
            cache = out.past_key_values
        for r in rows:
            self.prefilling.remove(r)
            r.filled = len(r.seq.ids)
        toks = self._sample(rows, out.logits[:, -1, :])
        keep = [i for i, (r, t) in enumerate(zip(rows, toks)) if not self._push(r, t)]
        if keep:
            self._join([rows[i] for i in keep], cache, mask, keep)

    # ------------------------------------------------------------------ rows

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token with its own parameters (greedy rows in one argmax)."""
        logits = logits.to(torch.float32)
        toks = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(rows):
            if r.generator is not None:
                toks[i] = int(next_tokens(logits[i : i + 1], r.seq.params, r.generator)[0])
        return toks

    def _push(self, r: _Row, tok: int) -> bool:
        """Add a row's token and stream what it has (its first token and its end at once, else at
        most every `stream_interval`); True when the row is finished (and ended)."""
        r.last = tok
        r.state.push(tok)
        if r.seq.on_delta is not None:
            now = time.monotonic()
            if r.state.done or r.sent_at is None or now - r.sent_at >= self.stream_interval:
                delta = r.state.take_delta()
                if delta.text or delta.finish_reason is not None or delta.token_ids:
                    r.seq.on_delta(delta)
                    r.sent_at = now
        if r.state.done:
            self._end(r)
            return True
        return False

    def _end(self, r: _Row, cancelled: bool = False) -> None:
        r.stack.close()  # the adapter lease
        r.cache = None
        if cancelled:
            self.cancelled += 1
            r.seq.on_done(None, None)
        else:
            r.seq.on_done(r.state.output(), None)

    def fail_all(self, exc: BaseException) -> None:
        """An engine failure: every admitted sequence gets it; the batch starts empty."""
        for r in self.rows + list(self.prefilling):
            r.stack.close()
            r.seq.on_done(None, exc)
        self.rows, self.prefilling = [], deque()
        self._cache = self._mask = None
        self._lengths = []

    def _drop(self, idx: list[int], cancelled: bool = False) -> None:
        """Remove rows `idx` (already ended unless cancelled) from the batch and its cache."""
        if not idx:
            return
        gone = set(idx)
        if cancelled:
            for i in idx:
                self._end(self.rows[i], cancelled=True)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        self._lengths = [self._lengths[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            self._stacks = RowStacks()  # let go of the factors it held
            return
        assert self._mask is not None
        cut = self._mask.shape[1] - max(self._lengths)  # columns every remaining row pads
        sel = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._mask = self._mask.index_select(0, sel)[:, cut:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, sel)[:, :, cut:]
            layer.values = layer.values.index_select(0, sel)[:, :, cut:]

    def _join(self, rows: list[_Row], cache: Any, mask: torch.Tensor, keep: list[int]) -> None:
        """Append prefilled rows (positions `keep` of `cache`) to the batch, left-padding the narrower side."""
        lengths = [len(r.seq.ids) for r in rows]
        if len(keep) < mask.shape[0]:
            sel = torch.tensor(keep, dtype=torch.long, device=self.device)
            mask = mask.index_select(0, sel)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, sel), layer.values.index_select(0, sel)
        cut = mask.shape[1] - max(lengths)
        if cut:
            mask = mask[:, cut:]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
        if self._cache is None:
            for layer in cache.layers:
                if type(layer) is DynamicLayer:
                    layer.__class__ = SlackLayer  # the same state; an update that writes into slack
            self._cache, self._mask = cache, mask
        else:
            assert self._mask is not None
            width = max(self._mask.shape[1], mask.shape[1])
            self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)], dim=0)
            for mine, theirs in zip(self._cache.layers, cache.layers):
                mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)], dim=0)
                mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)], dim=0)
        self.rows += rows
        self._lengths += lengths


class SlackLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views into buffers with room to grow.

    Why: `DynamicLayer.update` concatenates, copying a layer's whole cache at every decode step
    (16 rows of ~100 tokens of the 58M Llama: 26 MB a step). Here a step writes its new column
    into the slack and the view grows; a buffer is reallocated (with half its length again as
    slack, never past `cap`) only when full or when the batch replaced the tensors (a row joined
    or left: `ContinuousDecoder._join` / `_drop` assign new ones, which `_holds` detects).
    `cap` is the batch's longest reservation (prompt + max_tokens), which no row's padded
    length can pass, so the slack stays within what the KV budget accounts for."""

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None
    cap: int = 0  # set by the decoder before each decode forward

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        width, new = self.keys.shape[-2], key_states.shape[-2]
        if not self._holds(width + new):
            room = max(width + new, min(width + new + max(16, (width + new) // 2), self.cap))
            self._kbuf, self._vbuf = _with_slack(self.keys, room), _with_slack(self.values, room)
        assert self._kbuf is not None and self._vbuf is not None
        self._kbuf[:, :, width : width + new].copy_(key_states)
        self._vbuf[:, :, width : width + new].copy_(value_states)
        self.keys, self.values = self._kbuf[:, :, : width + new], self._vbuf[:, :, : width + new]
        return self.keys, self.values

    def _holds(self, width: int) -> bool:
        """Whether keys and values are still the leading views of the buffers, with room for `width`."""
        k, v = self._kbuf, self._vbuf
        return (
            k is not None and v is not None and k.shape[-2] >= width
            and self.keys.data_ptr() == k.data_ptr() and self.values.data_ptr() == v.data_ptr()
            and self.keys.shape[:2] == k.shape[:2] and self.keys.stride() == k.stride()
        )


def _with_slack(t: torch.Tensor, width: int) -> torch.Tensor:
    """A buffer [rows, heads, width, dim] that starts with `t`'s columns."""
    rows, heads, have, dim = t.shape
    buf = t.new_empty((rows, heads, width, dim))
    buf[:, :, :have].copy_(t)
    return buf


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`t` with zeros prepended along `dim` up to `width` (masked positions: their value never counts)."""
    short = width - t.shape[dim]
    if short == 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of keys and values one token holds in the cache, over every layer."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    elem = next(model.parameters()).element_size()
    return 2 * int(cfg.num_hidden_layers) * kv_heads * head_dim * elem


class DecodeLoop:
    """The waiting queue and the threads that drive `ContinuousDecoder`s while work exists.

    The replica runs one decoder (EngineRunner.decode_loop says why); several decoders, each
    on its own thread with its own batch and share of the KV budget, are supported for tests
    of concurrent weight states. A waiting sequence goes, in arrival order, to the decoder with
    the fewest sequences that can hold it. `submit` may be called from any thread; callbacks
    run on the loop threads.
    """

    def __init__(self, decoders: list[ContinuousDecoder], threads: int | None = None) -> None:
        self.decoders = decoders
        self.threads = threads  # torch threads of each decode thread (None: the process's setting)
        for d in decoders:
            d.peers = decoders
        self._waiting: deque[GenSequence] = deque()
        self._cond = threading.Condition()
        self._threads: dict[int, threading.Thread] = {}
        self._closed = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(d.active for d in self.decoders)

    @property
    def cancelled(self) -> int:
        return sum(d.cancelled for d in self.decoders)

    def check(self, seq: GenSequence) -> None:
        """InvalidRequest (400) if `seq` could never fit a decoder's KV budget."""
        self.decoders[0].check(seq)

    def submit(self, seq: GenSequence) -> None:
        self.check(seq)
        with self._cond:
            self._waiting.append(seq)
            for i, d in enumerate(self.decoders):
                if i not in self._threads:
                    t = threading.Thread(target=self._run, args=(i,), name=f"capaserve-decode-{i}", daemon=True)
                    self._threads[i] = t
                    t.start()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _admit(self, dec: ContinuousDecoder) -> None:
        """Waiting sequences in arrival order, while this decoder is the least busy one that fits them
        (a cancelled one is just dropped)."""
        while True:
            with self._cond:
                if not self._waiting:
                    return
                head = self._waiting[0]
                if not head.cancelled.is_set():
                    if dec.active > min(d.active for d in self.decoders) or not dec.fits(head):
                        return
                self._waiting.popleft()
            if head.cancelled.is_set():
                head.on_done(None, None)
                continue
            try:
                dec.admit(head)
            except Exception as exc:  # noqa: BLE001 - handed to its caller
                head.on_done(None, exc)

    def _run(self, i: int) -> None:
        dec = self.decoders[i]
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                if self._closed or (not self._waiting and not dec.active):
                    del self._threads[i]
                    return
            self._admit(dec)
            if not dec.active:
                with self._cond:  # another decoder takes the head: wait for a change
                    self._cond.wait(timeout=0.05)
                continue
            try:
                dec.step()
            except Exception as exc:  # noqa: BLE001 - every sequence gets it; the loop goes on
                dec.fail_all(exc)
            if not dec.active:
                with self._cond:
                    self._cond.notify_all()
