"""Task calls on the active adapter vs hand computations: classification head, greedy
generation vs a hand greedy loop on a hand-merged model, seeded sampling, stop strings,
EOS, streaming, batched left-padded generation, and request errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from adapters.bundle import Task
from adapters.tasks.errors import AdapterNotLoaded, InvalidRequest, UnsupportedTask
from serving.engine.engine import Engine
from serving.engine.sampling import SamplingParams
from tests.engine_utils import (
    MINILM_ID,
    bundle_for,
    classify,
    embed,
    engine_for,
    hand_merge,
    plain_model,
    same_weights,
    weights_snapshot,
)

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
TEXTS = ["a great movie", "the worst film ever made, truly", "ok"]


@pytest.fixture(scope="module")
def minilm(minilm_dir) -> Engine:
    return engine_for(minilm_dir, MINILM_ID)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir) -> Engine:
    engine = engine_for(tiny_llama_dir)
    engine.load_adapter("x", bundle_for(engine, LLAMA_TARGETS, seed=11, std=0.5))
    engine.load_adapter("y", bundle_for(engine, LLAMA_TARGETS[:2], seed=12, std=0.5))
    return engine


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classify_matches_hand_head(minilm: Engine, minilm_dir, pooling: str) -> None:
    bundle = bundle_for(
        minilm, ("attention.self.value",), seed=5, task=Task.SEQUENCE_CLASSIFICATION,
        labels=["neg", "neu", "pos"], pooling=pooling,
    )
    if pooling == "cls":  # also the variant without the dense layer
        bundle.head = {k: v for k, v in bundle.head.items() if k.startswith("head.out")}
    name = f"clf-{pooling}"
    minilm.load_adapter(name, bundle)
    out = classify(minilm, TEXTS, name)

    batch = dict(minilm.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with torch.inference_mode():
        h = hand_merge(plain_model(minilm_dir, Task.FEATURE_EXTRACTION), bundle)(**batch).last_hidden_state
    if pooling == "mean":
        m = batch["attention_mask"].unsqueeze(-1).float()
        x = (h * m).sum(1) / m.sum(1)
    else:
        x = h[:, 0]
    if "head.dense.weight" in bundle.head:
        x = torch.tanh(x @ bundle.head["head.dense.weight"].T + bundle.head["head.dense.bias"])
    probs = torch.softmax(x @ bundle.head["head.out.weight"].T + bundle.head["head.out.bias"], dim=-1)

    torch.testing.assert_close(out.probs, probs, atol=1e-5, rtol=0)
    assert out.label_names == ["neg", "neu", "pos"]
    assert out.labels == [["neg", "neu", "pos"][i] for i in probs.argmax(-1).tolist()]
    assert out.prompt_tokens == minilm.count_tokens(TEXTS)


def _hand_greedy(model: torch.nn.Module, ids: list[int], n: int, eos: int) -> list[int]:
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            tok = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(tok)
            if tok == eos:
                break
    return out


@pytest.mark.parametrize("adapter", [None, "x"])
def test_greedy_equals_hand_loop_on_hand_merged_model(llama: Engine, tiny_llama_dir, adapter: str | None) -> None:
    prompt = "the quick brown fox"
    model = plain_model(tiny_llama_dir, Task.CAUSAL_LM)
    if adapter is not None:
        hand_merge(model, bundle_for(llama, LLAMA_TARGETS, seed=11, std=0.5))
    ids = llama.tokenizer(prompt)["input_ids"]
    want = _hand_greedy(model, ids, GREEDY.max_tokens, llama.tokenizer.eos_token_id)
    (got,) = llama.generate([prompt], adapter, GREEDY)
    assert got.token_ids == want
    assert got.prompt_tokens == len(ids) and got.completion_tokens == len(want)
    assert got.finish_reason == "length"
    assert got.text == llama.tokenizer.decode(want, skip_special_tokens=True)


def test_adapters_differ_and_batches_match_single_prompts(llama: Engine) -> None:
    prompts = ["the quick brown fox", "hello", "capaboost adapters are merged into"]
    batched = llama.generate(prompts, "x", GREEDY)
    assert [o.token_ids for o in batched] == [llama.generate([p], "x", GREEDY)[0].token_ids for p in prompts]
    assert batched[0].token_ids != llama.generate(prompts[:1], None, GREEDY)[0].token_ids


def test_seeded_sampling_is_reproducible(llama: Engine) -> None:
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    a = llama.generate(["hello world"], "x", p)[0]
    llama.generate(["hello world"], "y", SamplingParams(max_tokens=3, temperature=1.0))  # unseeded, other adapter
    assert llama.generate(["hello world"], "x", p)[0] == a
    others = {tuple(llama.generate(["hello world"], "x", p.model_copy(update={"seed": s}))[0].token_ids) for s in range(4)}
    assert len(others) > 1
    # a vanishing nucleus keeps only the most likely token: greedy
    tiny_p = SamplingParams(max_tokens=10, temperature=0.7, top_p=1e-6, seed=3)
    assert llama.generate(["hello world"], "x", tiny_p)[0].token_ids == llama.generate(
        ["hello world"], "x", GREEDY.model_copy(update={"max_tokens": 10})
    )[0].token_ids


def _streamed(engine: Engine, prompt: str, adapter: str | None, params: SamplingParams):
    deltas = list(engine.generate_stream(prompt, adapter, params))
    assert all(d.finish_reason is None for d in deltas[:-1]) and deltas[-1].finish_reason is not None
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas[-1].finish_reason


@pytest.mark.parametrize("adapter", [None, "x"])
def test_stop_strings_and_streaming(tiny_gpt2_dir, adapter: str | None) -> None:
    engine = engine_for(tiny_gpt2_dir)
    engine.load_adapter("x", bundle_for(engine, ("attn.c_attn", "mlp.c_fc"), seed=2, std=0.3))
    prompt = "the quick brown"
    full = engine.generate([prompt], adapter, SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert len(full.text) > 6
    assert _streamed(engine, prompt, adapter, SamplingParams(max_tokens=24, temperature=0.0)) == (
        full.text, full.token_ids, "length"
    )
    stop = full.text[4:6]
    cut = full.text[: full.text.find(stop)]
    params = SamplingParams(max_tokens=24, temperature=0.0, stop=["never-there", stop])
    got = engine.generate([prompt], adapter, params)[0]
    assert (got.text, got.finish_reason) == (cut, "stop")
    assert got.token_ids == full.token_ids[: len(got.token_ids)] and len(got.token_ids) < 24
    text, toks, reason = _streamed(engine, prompt, adapter, params)
    assert (text, toks, reason) == (got.text, got.token_ids, "stop")
    sampled = SamplingParams(max_tokens=16, temperature=0.9, seed=7, stop=[stop])
    s = engine.generate([prompt], adapter, sampled)[0]
    assert _streamed(engine, prompt, adapter, sampled) == (s.text, s.token_ids, s.finish_reason)


def test_eos_finishes_with_stop(tiny_gpt2_dir, tmp_path: Path) -> None:
    engine = engine_for(tiny_gpt2_dir)
    first = engine.generate(["hello"], None, GREEDY)[0].token_ids
    folder = shutil.copytree(tiny_gpt2_dir, tmp_path / "m")
    cfg = json.loads((folder / "generation_config.json").read_text())
    eos = first[2]
    cfg["eos_token_id"] = [engine.tokenizer.eos_token_id, eos]
    (folder / "generation_config.json").write_text(json.dumps(cfg))
    out = engine_for(folder).generate(["hello"], None, GREEDY)[0]
    assert out.token_ids == first[: first.index(eos) + 1] and out.finish_reason == "stop"


def test_interleaved_streams_of_different_adapters(llama: Engine) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.0)
    ref = {a: llama.generate(["the quick brown fox"], a, params)[0].token_ids for a in ("x", "y", None)}
    streams = {a: llama.generate_stream("the quick brown fox", a, params) for a in ("x", "y", None)}
    got: dict[str | None, list[int]] = {a: [] for a in streams}
    live = dict(streams)
    while live:
        for a, it in list(live.items()):  # one step each, round robin: a swap before every step
            d = next(it, None)
            if d is None:
                del live[a]
            else:
                got[a] += d.token_ids
    assert got == ref


def test_unload_during_a_stream_waits_for_it_to_end(tiny_llama_dir) -> None:
    """An adapter unloaded (evicted upstream, or its version deleted) while a stream of it is
    between two steps: the stream ends exactly as an undisturbed one, the adapter is gone
    once it does, and the base weights are the pristine ones again, bit for bit."""
    engine = engine_for(tiny_llama_dir)
    pristine = weights_snapshot(engine.model)
    engine.load_adapter("z", bundle_for(engine, LLAMA_TARGETS, seed=13, std=0.5))
    params = SamplingParams(max_tokens=8, temperature=0.0)
    want = engine.generate(["the quick brown fox"], "z", params)[0].token_ids
    stream = engine.generate_stream("the quick brown fox", "z", params)
    got = list(next(stream).token_ids)
    engine.unload_adapter("z")
    assert engine.has_adapter("z")  # still leased by the stream
    base_now = engine.generate(["the quick brown fox"], None, params)[0].token_ids  # others go on meanwhile
    for d in stream:
        got += d.token_ids
    assert got == want
    assert not engine.has_adapter("z") and engine.stats().loaded_adapters == 0
    assert same_weights(engine.model, pristine)
    assert engine.generate(["the quick brown fox"], None, params)[0].token_ids == base_now
    with pytest.raises(AdapterNotLoaded):
        engine.generate(["x"], "z", params)


def test_chat_template_and_counts(llama: Engine, minilm: Engine) -> None:
    text = llama.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|user|>hi<|end|><|assistant|>"
    assert llama.count_tokens([text, "hello"]) == len(llama.tokenizer(text)["input_ids"]) + len(
        llama.tokenizer("hello")["input_ids"]
    )
    with pytest.raises(UnsupportedTask, match="no chat template"):
        minilm.apply_chat_template([{"role": "user", "content": "hi"}])


def test_request_errors(llama: Engine, minilm: Engine) -> None:
    minilm.load_adapter("fe", bundle_for(minilm, ("attention.self.value",), seed=1))
    cases = [
        (lambda: embed(llama, ["x"]), UnsupportedTask, "causal LM"),
        (lambda: minilm.generate(["x"], None, GREEDY), UnsupportedTask, "encoder"),
        (lambda: classify(minilm, ["x"], "fe"), UnsupportedTask, "not sequence-classification"),
        (lambda: embed(minilm, []), InvalidRequest, "non-empty"),
        (lambda: embed(minilm, ["word " * 600]), InvalidRequest, "more than the limit of 512"),
        (lambda: llama.generate(["hi"], None, SamplingParams(max_tokens=300)), InvalidRequest, "exceeds the limit"),
        (lambda: llama.generate_stream("hi", "nope", GREEDY), AdapterNotLoaded, "nope"),
        (lambda: embed(minilm, ["x"], "nope"), AdapterNotLoaded, "nope"),
    ]
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()
