"""Continuous batching through real Ray Serve on a tiny random Llama: concurrent greedy requests of
mixed adapters (base included), streamed and whole, with different max_tokens, each equal to its
own single-request greedy `generate()` on a plain transformers model with W' set by hand; a
full KV budget queues and then answers 503; a client that leaves frees its sequence; stop
strings; seeds reproduce."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch

from adapters.bundle import Task, save_bundle
from adapters.synthetic import random_bundle
from serving.engine.continuous import kv_bytes_per_token
from tests.engine_utils import hand_merge, plain_model
from tests.serve_helpers import running_app

pytestmark = pytest.mark.ray

BASE = "tiny-llama"
PROMPTS = ["the quick brown fox", "hello world", "capaboost adapters are merged", "user reply answer", "the lazy dog"]
ROWS = 2  # sequences of <= RESERVE tokens the KV budget holds at once
RESERVE = 80


@pytest.fixture(scope="module")
def refs(tiny_llama_dir):
    base = plain_model(tiny_llama_dir, Task.CAUSAL_LM)
    targets = [n for n, m in base.named_modules() if n.endswith(("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))]
    from adapters.tasks.model_loader import meta_spec, model_source
    from serving.config import EngineConfig

    spec = meta_spec(model_source(EngineConfig(model=str(tiny_llama_dir))), BASE)
    bundles = {f"ad{i}": random_bundle(spec, targets, seed=20 + i, std=0.3) for i in range(2)}
    models = {BASE: base, **{n: hand_merge(plain_model(tiny_llama_dir, Task.CAUSAL_LM), b) for n, b in bundles.items()}}
    return bundles, models


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, tiny_llama_dir, refs):
    bundles, models = refs
    kv = ROWS * RESERVE * kv_bytes_per_token(models[BASE])
    args = {
        "model": str(tiny_llama_dir), "served_model_name": BASE, "registry": str(tmp_path_factory.mktemp("registry")),
        "replicas": 1, "num_cpus": 1, "kv_cache_bytes": kv, "max_queue": 4,
    }
    with running_app(args, num_cpus=2) as base:
        for name, b in bundles.items():
            path = save_bundle(b, tmp_path_factory.mktemp("b") / f"{name}.safetensors")
            r = httpx.put(f"{base}/v1/adapters/{name}", content=path.read_bytes(), timeout=60)
            assert r.status_code == 201, r.text
        yield base


def reference(tiny_llama_dir, models, model: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    """transformers' own greedy generate() on W', the request alone: (text, completion tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    ids = tok(prompt)["input_ids"]
    out = models[model].generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, len(ids):].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id) + 1]
    return tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False), len(new)


def complete(url: str, model: str, prompt: str, max_tokens: int, stream: bool, **extra) -> tuple[int, str, int, str]:
    """(status, text, completion tokens, error message) of one /v1/completions request."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    if not stream:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        if r.status_code != 200:
            return r.status_code, "", 0, r.json()["error"]["message"]
        j = r.json()
        return 200, j["choices"][0]["text"], j["usage"]["completion_tokens"], ""
    body.update(stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            return r.status_code, "", 0, json.loads(r.read())["error"]["message"]
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ") and x != "data: [DONE]"]
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    return 200, text, events[-1]["usage"]["completion_tokens"], ""


def concurrently(calls: list) -> list:
    out: list = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


def test_mixed_adapters_joining_and_leaving_equal_their_own_greedy_generate(base_url, tiny_llama_dir, refs):
    """Base and two adapters, streamed and whole, max_tokens 3..60, more requests than the budget
    holds at once (they wait, then join as others leave): each equals its own generate() on W'."""
    _, models = refs
    plan = [(BASE, PROMPTS[0], 40, True), ("ad0", PROMPTS[1], 3, False), ("ad1", PROMPTS[2], 25, True),
            ("ad0", PROMPTS[3], 9, False), (BASE, PROMPTS[4], 17, False), ("ad1", PROMPTS[0], 6, True)]
    got = concurrently([lambda m=m, p=p, n=n, s=s: complete(base_url, m, p, n, s) for m, p, n, s in plan])
    for (model, prompt, n, _), (status, text, tokens, err) in zip(plan, got):
        assert status == 200, err
        assert (text, tokens) == reference(tiny_llama_dir, models, model, prompt, n), (model, prompt, n)


def test_full_kv_budget_queues_then_answers_503(base_url, tiny_llama_dir, refs):
    """The budget holds 2 sequences, the replica queue 4 more (Ray holds as many again in the
    caller): of 16 simultaneous requests some get 503, every other one its exact answer."""
    _, models = refs
    got = concurrently([lambda i=i: complete(base_url, "ad0", PROMPTS[i % 5], 60, False) for i in range(16)])
    statuses = [g[0] for g in got]
    assert 503 in statuses and set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= ROWS + 4
    for i, (status, text, tokens, _) in enumerate(got):
        if status == 200:
            assert (text, tokens) == reference(tiny_llama_dir, models, "ad0", PROMPTS[i % 5], 60)
    status, *_, err = complete(base_url, BASE, PROMPTS[0], ROWS * RESERVE + 10, False)
    assert status == 400 and "kv_cache_bytes" in err  # could never fit, even alone


def test_client_leaving_frees_its_sequence(base_url):
    body = {"model": "ad1", "prompt": PROMPTS[0], "max_tokens": 70, "temperature": 1.0, "seed": 3, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        next(resp.iter_lines())  # the first token, then hang up
    metrics = ""
    for _ in range(30):  # each answer carries the replica's counters
        assert complete(base_url, BASE, PROMPTS[1], 4, False)[0] == 200
        metrics = httpx.get(f"{base_url}/metrics", timeout=30).text
        if _sample(metrics, "capaserve_sequences_cancelled_total") >= 1:
            break
    assert _sample(metrics, "capaserve_sequences_cancelled_total") == 1
    assert _sample(metrics, "capaserve_running_sequences") == 0
    assert _sample(metrics, "capaserve_time_to_first_token_seconds_count") >= 1


def _sample(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name + "{"))


def test_stop_strings_and_seeds(base_url, tiny_llama_dir, refs):
    _, models = refs
    full, _ = reference(tiny_llama_dir, models, "ad1", PROMPTS[2], 20)
    stop = full[4:7]
    status, text, _, err = complete(base_url, "ad1", PROMPTS[2], 20, True, stop=[stop])
    assert status == 200, err
    assert text == full[: full.find(stop)]
    sampled = {"temperature": 0.8, "top_p": 0.9, "seed": 11}
    a = concurrently([lambda: complete(base_url, "ad0", PROMPTS[3], 15, False, **sampled),
                      lambda: complete(base_url, BASE, PROMPTS[1], 30, True, temperature=1.0, seed=5)])
    b = complete(base_url, "ad0", PROMPTS[3], 15, True, **sampled)
    assert a[0][1] == b[1] and a[0][0] == 200
