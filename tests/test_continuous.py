"""Continuous batching (serving/engine/continuous.py) on tiny random Llama and GPT-2, driven step
by step: every greedy row equals its own single-request `generate()` on a plain transformers
model whose weights were replaced by hand (W'), whatever joined or left the batch meanwhile."""

from __future__ import annotations

import pytest
import torch

from adapters.bundle import Task
from adapters.synthetic import random_bundle
from serving.engine.continuous import GenSequence
from serving.engine.sampling import SamplingParams
from adapters.tasks.errors import InvalidRequest
from tests.engine_utils import engine_with, hand_merge, plain_model

PROMPTS = ["the quick brown fox", "hello", "capaboost adapters are merged into the base weights", "user reply"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tiny_llama_dir, tiny_gpt2_dir):
    folder = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    probe = engine_with(folder, "tiny", {})
    targets = [n for n in probe.spec.linear_shapes][:4]
    bundles = {f"a{i}": random_bundle(probe.spec, targets, seed=10 + i, std=0.3) for i in range(2)}
    engine = engine_with(folder, "tiny", bundles)
    refs = {None: plain_model(folder, Task.CAUSAL_LM)}
    for name, b in bundles.items():
        refs[name] = hand_merge(plain_model(folder, Task.CAUSAL_LM), b)
    return engine, refs


def reference(refs, engine, prompt: str, adapter: str | None, max_tokens: int) -> list[int]:
    """transformers' own greedy generate() on W', one request alone (EOS ends it)."""
    model = refs[adapter]
    ids = engine.prompt_ids([prompt], SamplingParams(max_tokens=max_tokens))[0]
    out = model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=max_tokens,
        do_sample=False, eos_token_id=sorted(engine._generator.eos_ids), pad_token_id=engine.tokenizer.pad_token_id,
    )
    return out[0, len(ids):].tolist()


class Collector:
    def __init__(self) -> None:
        self.done: dict[int, object] = {}
        self.deltas: dict[int, list] = {}

    def seq(self, engine, i: int, prompt: str, adapter: str | None, params: SamplingParams, stream: bool = False):
        ids = engine.prompt_ids([prompt], params)[0]
        self.deltas[i] = []
        return GenSequence(
            ids=ids, adapter=adapter, params=params,
            on_delta=(lambda d: self.deltas[i].append(d)) if stream else None,
            on_done=lambda out, exc: self.done.__setitem__(i, exc or out),
        )


def run(dec, pending: dict[int, list[GenSequence]], steps: int = 400) -> None:
    """Admit pending[k] before step k (what the decode loop does between steps), until all end."""
    for k in range(steps):
        for s in pending.get(k, []):
            assert dec.fits(s)
            dec.admit(s)
        if not dec.active and k > max(pending):
            return
        dec.step()
    raise AssertionError("did not finish")


def test_mixed_adapters_joining_and_leaving_equal_single_greedy_generate(setup):
    """Base and two adapters, different max_tokens, joining at different steps; chunked prefill of
    the long prompt (4-token chunks): every row equals transformers' generate() on its own W'."""
    engine, refs = setup
    dec = engine.continuous_decoder(max_rows=16, prefill_tokens=4)
    col = Collector()
    plan = [(0, PROMPTS[0], "a0", 12), (0, PROMPTS[1], None, 5), (2, PROMPTS[2], "a1", 9), (3, PROMPTS[3], "a0", 20),
            (7, PROMPTS[1], "a1", 3), (15, PROMPTS[0], None, 7)]
    pending: dict[int, list[GenSequence]] = {}
    for i, (step, prompt, adapter, n) in enumerate(plan):
        pending.setdefault(step, []).append(col.seq(engine, i, prompt, adapter, SamplingParams(max_tokens=n, temperature=0)))
    run(dec, pending)
    for i, (_, prompt, adapter, n) in enumerate(plan):
        want = reference(refs, engine, prompt, adapter, n)
        got = col.done[i]
        assert got.token_ids == want, (i, adapter)
    assert dec.rows == [] and dec._kv is None  # every row left, the cache is gone


def test_one_adapter_runs_merged_and_streams_concatenate(setup):
    engine, refs = setup
    dec = engine.continuous_decoder(max_rows=16, prefill_tokens=512)
    col = Collector()
    seqs = [col.seq(engine, i, p, "a1", SamplingParams(max_tokens=10, temperature=0), stream=True) for i, p in enumerate(PROMPTS)]
    swaps = engine.stats().swaps
    run(dec, {0: seqs[:2], 4: seqs[2:]})
    assert engine.stats().swaps - swaps <= 1  # merged once, never mixed
    for i, p in enumerate(PROMPTS):
        assert col.done[i].token_ids == reference(refs, engine, p, "a1", 10)
        assert "".join(d.text for d in col.deltas[i]) == col.done[i].text
        assert col.deltas[i][0].token_ids  # the first token is sent the step it exists


def test_stream_interval_sends_first_token_and_end_at_once_and_the_rest_in_between(setup):
    """Every token a message (interval 0) or only the first token and the rest with the end (an
    interval no step reaches): the same text either way, the first token sent the step it exists."""
    engine, _ = setup
    params = SamplingParams(max_tokens=10, temperature=0)
    texts = {}
    for interval, messages in ((0.0, 10), (3600.0, 2)):
        dec = engine.continuous_decoder(max_rows=16, prefill_tokens=512, stream_interval_s=interval)
        col = Collector()
        run(dec, {0: [col.seq(engine, 0, PROMPTS[2], "a0", params, stream=True)]})
        deltas = col.deltas[0]
        assert col.done[0].completion_tokens == 10  # ran to max_tokens, so both counts are exact
        assert len(deltas) == messages and len(deltas[0].token_ids) == 1 and deltas[-1].finish_reason == "length"
        assert sum(len(d.token_ids) for d in deltas) == 10
        texts[interval] = "".join(d.text for d in deltas)
        assert texts[interval] == col.done[0].text
    assert texts[0.0] == texts[3600.0]


def test_seeded_rows_reproduce_whatever_they_are_batched_with(setup):
    engine, _ = setup
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    alone = Collector()
    dec = engine.continuous_decoder(max_rows=16, prefill_tokens=512)
    run(dec, {0: [alone.seq(engine, 0, PROMPTS[0], "a0", params)]})
    mixed = Collector()
    others = [mixed.seq(engine, i, p, a, SamplingParams(max_tokens=8, temperature=1.0, seed=i))
              for i, (p, a) in enumerate([(PROMPTS[1], None), (PROMPTS[2], "a1")], start=1)]
    run(dec, {0: others, 2: [mixed.seq(engine, 0, PROMPTS[0], "a0", params)]})
    assert mixed.done[0].token_ids == alone.done[0].token_ids


def test_stop_strings_and_cancel_free_rows_within_one_step(setup):
    engine, _ = setup
    dec = engine.continuous_decoder(max_rows=16, prefill_tokens=512)
    col = Collector()
    full = engine.generate([PROMPTS[0]], None, SamplingParams(max_tokens=16, temperature=0))[0]
    stop = full.text[3:5]
    s0 = col.seq(engine, 0, PROMPTS[0], None, SamplingParams(max_tokens=16, temperature=0, stop=[stop]))
    s1 = col.seq(engine, 1, PROMPTS[1], "a0", SamplingParams(max_tokens=200, temperature=0), stream=True)
    dec.admit(s0)
    dec.admit(s1)
    dec.step()
    dec.step()
    assert dec.active == 2 or 0 in col.done
    s1.cancelled.set()
    dec.step()  # the next step drops it before its forward
    assert 1 in col.done and col.done[1] is None and dec.cancelled == 1
    assert all(r.seq is not s1 for r in dec.rows)
    while dec.active:
        dec.step()
    assert col.done[0].text == full.text[: full.text.find(stop)] and col.done[0].finish_reason == "stop"


def test_kv_budget_admits_only_what_fits_and_refuses_what_never_can(setup):
    engine, _ = setup
    dec = engine.continuous_decoder(max_rows=16, prefill_tokens=512)
    col = Collector()
    params = SamplingParams(max_tokens=40, temperature=0)
    a = col.seq(engine, 0, PROMPTS[0], None, params)
    dec.budget = a.reserve * dec.bytes_per_token  # exactly one such sequence
    assert dec.fits(a)
    dec.admit(a)
    b = col.seq(engine, 1, PROMPTS[0], None, params)
    assert not dec.fits(b)
    huge = col.seq(engine, 2, PROMPTS[0], None, SamplingParams(max_tokens=100, temperature=0))
    with pytest.raises(InvalidRequest, match="kv_cache_bytes"):
        dec.check(huge)
    while dec.active:
        dec.step()
    assert dec.fits(b)


def test_decode_loop_two_decoders_on_threads_equal_single_greedy_generate(setup):
    """Two decoders side by side (a replica with two engine workers), mixed adapters: same tokens."""
    import threading

    from serving.engine.continuous import DecodeLoop

    engine, refs = setup
    loop = DecodeLoop([engine.continuous_decoder(16, 512, share=2) for _ in range(2)])
    plan = [(PROMPTS[i % 4], [None, "a0", "a1"][i % 3], 4 + 3 * i) for i in range(6)]
    results: dict[int, object] = {}
    all_done = threading.Event()

    def done(i, out, exc):
        results[i] = exc or out
        if len(results) == len(plan):
            all_done.set()

    for i, (prompt, adapter, n) in enumerate(plan):
        params = SamplingParams(max_tokens=n, temperature=0)
        loop.submit(GenSequence(ids=engine.prompt_ids([prompt], params)[0], adapter=adapter, params=params,
                                on_delta=None, on_done=lambda out, exc, i=i: done(i, out, exc)))
    assert all_done.wait(timeout=120)
    for i, (prompt, adapter, n) in enumerate(plan):
        assert results[i].token_ids == reference(refs, engine, prompt, adapter, n), i
    assert loop.running == 0 and loop.waiting == 0


def test_lm_head_gets_canonical_strides_and_the_same_logits(setup):
    """The loader gives the head a freshly laid out input (adapters/tasks/model_loader.py: a
    strided view leaves torch's fast CPU GEMM, even a 1-row one that `is_contiguous()`); the
    kept last position's logits are unchanged."""
    engine, refs = setup
    seen: list[tuple[int, ...]] = []
    head = engine.model.get_output_embeddings()
    spy = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].stride()))
    try:
        one = engine.prompt_ids(["the quick brown fox"], SamplingParams(max_tokens=4))[0]
        for rows in (2, 1):
            ids = torch.tensor([one] * rows)
            with torch.inference_mode(), engine.residency.merged(None):  # the base in the weights
                last = engine.model(input_ids=ids, logits_to_keep=1).logits
                full = refs[None](input_ids=ids).logits
            torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)
    finally:
        spy.remove()
    hidden = engine.model.config.get_text_config().hidden_size
    # our hook ran first (registered at load): the head computed on canonical strides
    assert seen == [(hidden, hidden, 1), (hidden, hidden, 1)]


def test_decode_steps_and_leaving_rows_keep_the_slot_buffers(setup):
    """SlotKV: while rows decode and leave, every step's keys are views of the same buffers (no
    per-step concatenation, no re-selection of the remaining rows), the buffers stay within the
    KV budget, and the tokens still equal the reference."""
    engine, refs = setup
    dec = engine.continuous_decoder(max_rows=16, prefill_tokens=512)
    col = Collector()
    lengths = [12, 4, 8]
    for i, p in enumerate(PROMPTS[:3]):
        dec.admit(col.seq(engine, i, p, None, SamplingParams(max_tokens=lengths[i], temperature=0)))
    dec.step()  # prefill all three, join, first decode step
    layer = dec._kv.cache.layers[0]
    ptrs = set()
    while dec.active:
        kv = dec._kv
        ptrs.add(layer.kbuf.data_ptr())
        assert layer.keys.data_ptr() == layer.kbuf[0, 0, kv.start].data_ptr()  # a view of the buffer
        assert kv.slots * kv.room * dec.bytes_per_token <= dec.budget
        dec.step()
    assert len(ptrs) == 1  # rows left (some end early) without new buffers
    for i, p in enumerate(PROMPTS[:3]):
        assert col.done[i].token_ids == reference(refs, engine, p, None, lengths[i])


def test_columns_outside_the_rows_never_count(setup, monkeypatch):
    """Whatever stale or uninitialised numbers a slot holds outside its rows' windows (here NaN,
    written into every fresh buffer), rows that join into those slots, widen the window or are
    compacted still equal the reference: every column a row's window covers is written first."""
    from serving.engine.continuous import SlotKV

    reshape = SlotKV._reshape

    def poisoned(self, rows, cap, width):
        n, a, b = self.n, self.start, self.end
        old = [(x.kbuf[:n, :, a:b].clone(), x.vbuf[:n, :, a:b].clone()) for x in self.cache.layers] if self.slots else None
        reshape(self, rows, cap, width)
        for x, kept in zip(self.cache.layers, old or [None] * len(self.cache.layers)):
            x.kbuf.fill_(float("nan"))
            x.vbuf.fill_(float("nan"))
            if kept is not None:
                x.kbuf[:n, :, self.start : self.end].copy_(kept[0])
                x.vbuf[:n, :, self.start : self.end].copy_(kept[1])

    monkeypatch.setattr(SlotKV, "_reshape", poisoned)
    engine, refs = setup
    # a budget of 180 tokens: little room ahead, so the window is also compacted
    dec = engine.continuous_decoder(max_rows=16, prefill_tokens=512)
    dec.budget = 180 * dec.bytes_per_token
    col = Collector()
    # short first, then a longer prompt joins (the window widens), rows leave and others join
    # their slots
    plan = [(0, PROMPTS[1], None, 14), (1, PROMPTS[3], "a0", 3), (3, PROMPTS[2], "a1", 10), (6, PROMPTS[0], None, 6),
            (9, PROMPTS[2], None, 4), (12, PROMPTS[1], "a0", 9)]
    pending: dict[int, list[GenSequence]] = {}
    for i, (step, prompt, adapter, n) in enumerate(plan):
        pending.setdefault(step, []).append(col.seq(engine, i, prompt, adapter, SamplingParams(max_tokens=n, temperature=0)))
    run(dec, pending)
    for i, (_, prompt, adapter, n) in enumerate(plan):
        assert col.done[i].token_ids == reference(refs, engine, prompt, adapter, n), i


def test_a_sliding_window_model_decodes_within_its_window_and_refuses_beyond(tmp_path):
    """Mistral's KV cache layers are sliding-window ones: while prompt + max_tokens fits the
    window (48 tokens here) they hold every token, so rows joining and leaving still equal
    transformers' own generate(); a request that could outgrow the window is refused (400)."""
    from tests.tiny_models import build_tiny_causal_lm

    folder = build_tiny_causal_lm(tmp_path / "mistral", "mistral")
    engine = engine_with(folder, "tiny-mistral", {})
    refs = {None: plain_model(folder, Task.CAUSAL_LM)}
    dec = engine.continuous_decoder(max_rows=16, prefill_tokens=512)
    assert dec.window == 48
    col = Collector()
    plan = [(0, PROMPTS[0], 12), (0, PROMPTS[1], 5), (3, PROMPTS[3], 9)]
    pending: dict[int, list[GenSequence]] = {}
    for i, (step, prompt, n) in enumerate(plan):
        pending.setdefault(step, []).append(col.seq(engine, i, prompt, None, SamplingParams(max_tokens=n, temperature=0)))
    run(dec, pending)
    for i, (_, prompt, n) in enumerate(plan):
        assert col.done[i].token_ids == reference(refs, engine, prompt, None, n), i
    too_long = col.seq(engine, 9, PROMPTS[2], None, SamplingParams(max_tokens=48, temperature=0))
    with pytest.raises(InvalidRequest, match="sliding attention window"):
        dec.check(too_long)
