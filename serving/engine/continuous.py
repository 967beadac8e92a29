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

KV cache: one batched transformers `DynamicCache` whose layers are slots of preallocated
buffers (`SlotKV`): row i in slot i, every row's tokens right-aligned (its left part masked),
with per-row position ids, so each row is computed as if it were alone (up to float rounding
of the matrix shapes). A joining row is copied into the next free slot, a leaving row's slot
takes the last row: neither copies the others. A cache per row (one forward per row) would
give up the batching this is for; transformers' paged continuous batching owns its own
forward loop and cannot pick weights per step.

Memory budget: a sequence's reservation is prompt + max_tokens tokens. A sequence is
admitted only while (rows + 1) x longest reservation x bytes per token fits `kv_cache_bytes`;
otherwise it waits in the queue (whose bound answers 503). One that could not fit even alone
is refused (400). The buffers (slots x room) stay within `kv_cache_bytes` too.

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
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

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
        self.window = sliding_window(model)
        self._kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.rows: list[_Row] = []  # decoding, row i in the cache's slot i
        self.prefilling: deque[_Row] = deque()
        self._kv: SlotKV | None = None
        self._lengths: list[int] = []  # tokens of each row in the cache
        self._stacks = RowStacks()  # the decode batch's stacked factor pairs (unmerged steps)
        self.cancelled = 0  # sequences dropped because their consumer left
        self.peers: list[ContinuousDecoder] = [self]  # decoders sharing the weights (DecodeLoop)

    # ------------------------------------------------------------------ admission

    @property
    def active(self) -> int:
        return len(self.rows) + len(self.prefilling)

    def check(self, seq: GenSequence) -> None:
        """Refuse (400) a sequence that could not fit the budget even alone, or that could grow
        past the model's sliding attention window (the slot cache keeps every token)."""
        if self.window is not None and seq.reserve > self.window:
            raise InvalidRequest(
                f"prompt plus max_tokens is {seq.reserve} tokens, more than this model's sliding attention window "
                f"({self.window} tokens), which continuous batching does not support; lower max_tokens"
            )
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
        kv = self._kv
        assert kv is not None
        kv.reserve(1, max(r.seq.reserve for r in self.rows))
        ids = torch.tensor([[r.last] for r in self.rows], dtype=torch.long, device=self.device)
        lengths = torch.tensor(self._lengths, dtype=torch.long, device=self.device)
        # row i holds its tokens in the window's last lengths[i] columns; the new token is one more
        cols = torch.arange(kv.width + 1, device=self.device)
        mask = (cols.unsqueeze(0) >= (kv.width - lengths).unsqueeze(-1)).to(torch.long)
        out = self._forward(
            self.rows, merged, self._stacks,
            input_ids=ids, attention_mask=mask, position_ids=lengths.unsqueeze(-1), past_key_values=kv.cache,
        )
        kv.advance(1)
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
            cache = r.cache
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
            self._join([rows[i] for i in keep], cache, None if len(keep) == len(rows) else keep)

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
        self._kv = None
        self._lengths = []

    def _drop(self, idx: list[int], cancelled: bool = False) -> None:
        """Remove rows `idx` (already ended unless cancelled) from the batch and its cache: each
        leaving row's slot takes the batch's last row, in the cache and in `rows` alike."""
        if not idx:
            return
        if cancelled:
            for i in idx:
                self._end(self.rows[i], cancelled=True)
        assert self._kv is not None
        for i in sorted(idx, reverse=True):
            self._kv.leave(i)
            self.rows[i], self._lengths[i] = self.rows[-1], self._lengths[-1]
            self.rows.pop()
            self._lengths.pop()
        if not self.rows:
            self._kv = None
            self._stacks = RowStacks()  # let go of the factors it held
            return
        self._kv.trim(max(self._lengths))

    def _join(self, rows: list[_Row], cache: Any, keep: list[int] | None) -> None:
        """Append prefilled rows (positions `keep` of `cache`, None: all; right-aligned in it) to the batch."""
        lengths = [len(r.seq.ids) for r in rows]
        if self._kv is None:
            self._kv = SlotKV(cache, self.budget // self.bytes_per_token, self.max_rows)
        cap = max(r.seq.reserve for r in self.rows + rows)
        self._kv.join(cache, keep, max(lengths), cap)
        self.rows += rows
        self._lengths += lengths


class SlotLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values are views `[:n, :, start:end]` of
    buffers `[slots, heads, room, dim]` that a `SlotKV` owns; a forward writes its new columns
    at `end` in place (no concatenation) and `SlotKV.advance` then moves `end`."""

    kv: "SlotKV"
    kbuf: torch.Tensor
    vbuf: torch.Tensor

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kv, new = self.kv, key_states.shape[-2]
        n, end = kv.n, kv.end
        assert key_states.shape[0] == n and end + new <= kv.room, "SlotKV.reserve was not called"
        self.kbuf[:n, :, end : end + new].copy_(key_states)
        self.vbuf[:n, :, end : end + new].copy_(value_states)
        self.keys, self.values = self.kbuf[:n, :, kv.start : end + new], self.vbuf[:n, :, kv.start : end + new]
        return self.keys, self.values


class SlotKV:
    """The decode batch's KV cache: row i of the batch lives in slot i of every layer's buffers,
    its tokens right-aligned so that every row's next token goes to the same column `end`; the
    live window is columns [start, end), start = end - the longest row (a row's shorter left
    part is masked).

    Why slots: a padded cache that is re-padded and concatenated when a sequence joins and
    re-selected when one leaves copies the whole cache (every row, every layer) at each of
    those events, and with varied lengths they come every few steps. Here a leaving row's slot
    takes the batch's last row (one row copied), a joining row is copied into the next free
    slot (its own columns only), and the window's left edge just moves. All rows are copied
    only when the buffers are outgrown (more rows than slots, or `end` reaching `room`), and
    then get slack (up to twice the rows, and room to the longest reservation or twice it)
    within the KV budget, so that is rare.

    Masked columns must hold finite numbers (attention multiplies them by a zero weight, and an
    uninitialised NaN would spread): every column a row's window covers holds its data, the
    prefill's padding, a former row's data, or zeros written when the window widened.
    """

    def __init__(self, cache: Any, budget_tokens: int, max_rows: int) -> None:
        for layer in cache.layers:
            # a sliding-window layer holds everything while a sequence is shorter than its
            # window, which the decoder makes sure of (`ContinuousDecoder.check`)
            if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
                raise InvalidRequest(f"continuous batching cannot hold this model's {type(layer).__name__} KV cache")
            layer.__class__ = SlotLayer
            layer.kv = self
        self.cache = cache
        self.budget_tokens = budget_tokens
        self.max_rows = max_rows
        self.n = self.start = self.end = self.room = self.slots = 0

    @property
    def width(self) -> int:
        return self.end - self.start

    def reserve(self, new: int, cap: int) -> None:
        """Room for `new` columns at `end` before a forward; `cap`: the rows' longest reservation."""
        if self.end + new > self.room:
            self._reshape(self.n, cap, self.width)

    def advance(self, new: int) -> None:
        """After a forward wrote `new` columns at `end`."""
        self.end += new
        self._views()

    def join(self, theirs: Any, keep: list[int] | None, width: int, cap: int) -> None:
        """Append rows `keep` (None: all) of a prefill cache whose last `width` columns hold them
        right-aligned; `cap` is the longest reservation once they joined."""
        k = theirs.layers[0].keys.shape[0] if keep is None else len(keep)
        n = self.n
        if n + k > self.slots or width > self.end:
            self._reshape(n + k, cap, max(self.width, width))
        start = min(self.start, self.end - width)
        sel = None if keep is None else torch.tensor(keep, dtype=torch.long, device=theirs.layers[0].keys.device)
        for mine, src in zip(self.cache.layers, theirs.layers):
            for buf, t in ((mine.kbuf, src.keys), (mine.vbuf, src.values)):
                t = t if sel is None else t.index_select(0, sel)
                buf[n : n + k, :, self.end - width : self.end].copy_(t[:, :, t.shape[2] - width :])
                buf[n : n + k, :, start : self.end - width].zero_()  # finite left of the new rows
                buf[:n, :, start : self.start].zero_()  # the window widened: finite for the others
        self.n, self.start = n + k, start
        self._views()

    def leave(self, i: int) -> None:
        """Drop row i: the last row moves into its slot (the caller moves its row list the same way)."""
        last = self.n - 1
        if i != last:
            for layer in self.cache.layers:
                layer.kbuf[i, :, self.start : self.end].copy_(layer.kbuf[last, :, self.start : self.end])
                layer.vbuf[i, :, self.start : self.end].copy_(layer.vbuf[last, :, self.start : self.end])
        self.n = last

    def trim(self, longest: int) -> None:
        """The window shrinks to the longest remaining row (after `leave`s)."""
        self.start = self.end - longest
        self._views()

    def _reshape(self, rows: int, cap: int, width: int) -> None:
        """New buffers for `rows` rows and a window of `width` columns placed at the left (so
        the room ahead is as long as it can be); the present rows' windows are copied over."""
        cap = max(cap, width + 1)
        slots = min(self.max_rows, max(8, 2 * rows))
        slots = max(rows, min(slots, self.budget_tokens // cap))
        room = max(cap, min(2 * cap, self.budget_tokens // slots))
        for layer in self.cache.layers:
            old_k, old_v = layer.kbuf if self.slots else layer.keys, layer.vbuf if self.slots else layer.values
            heads, dim = old_k.shape[1], old_k.shape[3]
            layer.kbuf = old_k.new_empty((slots, heads, room, dim))
            layer.vbuf = old_v.new_empty((slots, heads, room, dim))
            if self.slots and self.n:
                layer.kbuf[: self.n, :, width - self.width : width].copy_(old_k[: self.n, :, self.start : self.end])
                layer.vbuf[: self.n, :, width - self.width : width].copy_(old_v[: self.n, :, self.start : self.end])
        self.slots, self.room = slots, room
        self.start, self.end = width - self.width, width

    def _views(self) -> None:
        n, a, b = self.n, self.start, self.end
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.kbuf[:n, :, a:b], layer.vbuf[:n, :, a:b]


def _text_config(model: torch.nn.Module) -> Any:
    """The config that describes the model's text layers (a multimodal config nests it)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def sliding_window(model: torch.nn.Module) -> int | None:
    """The model's sliding (or chunked) attention window in tokens, the smallest if layers
    differ; None when every layer attends to the whole sequence."""
    cfg = _text_config(model)
    types = getattr(cfg, "layer_types", None)  # None: inferred from the fields, as transformers does
    sizes = [
        int(size)
        for attr, kind in (("sliding_window", "sliding"), ("attention_chunk_size", "chunked"))
        if (size := getattr(cfg, attr, None)) and (types is None or any(kind in t for t in types))
    ]
    return min(sizes) if sizes else None


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of keys and values one token holds in the cache, over every layer."""
    cfg = _text_config(model)
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
