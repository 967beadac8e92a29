"""Completions and chat on a tiny random Llama through real Ray Serve: whole, streamed
(SSE ending in [DONE]), abandoned mid-stream, and cut by a killed replica (the last test:
it waits for the replacement replica)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from adapters.bundle import save_bundle
from adapters.synthetic import random_bundle
from loadtest.faults import model_replica_pids
from tests.serve_helpers import error_of, running_app

pytestmark = pytest.mark.ray

BASE = "tiny-llama"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    from serving.config import EngineConfig
    from serving.engine.engine import Engine

    return Engine(EngineConfig(model=str(tiny_llama_dir), served_model_name=BASE, num_threads=1, dtype="float32"))


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, tiny_llama_dir, engine):
    targets = [n for n in engine.spec.linear_shapes if n.endswith(("self_attn.q_proj", "mlp.down_proj"))]
    bundle = random_bundle(engine.spec, targets, seed=3, std=0.3)
    path = save_bundle(bundle, tmp_path_factory.mktemp("b") / "chatty.safetensors")
    engine.load_adapter("chatty", bundle)
    args = {
        "model": str(tiny_llama_dir),
        "served_model_name": BASE,
        "registry": str(tmp_path_factory.mktemp("registry")),
        "replicas": 1,
        "num_cpus": 1,
    }
    with running_app(args, num_cpus=2) as base:
        r = httpx.put(f"{base}/v1/adapters/chatty", content=path.read_bytes(), timeout=60)
        assert r.status_code == 201, r.text
        yield base


def sse_events(resp: httpx.Response) -> list[str]:
    """The data payloads of an SSE response, in order."""
    return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize("model", [BASE, "chatty"])
def test_streamed_chat_equals_whole_greedy_answer(base_url, engine, model):
    body = {"model": model, "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    whole = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert whole.status_code == 200, whole.text
    answer = whole.json()
    text = answer["choices"][0]["message"]["content"]
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"

    from serving.engine.sampling import SamplingParams

    prompt = engine.apply_chat_template(MESSAGES)
    ref = engine.generate([prompt], None if model == BASE else "chatty", SamplingParams(max_tokens=24, temperature=0))[0]
    assert text == ref.text
    assert answer["usage"] == {
        "prompt_tokens": ref.prompt_tokens,
        "completion_tokens": ref.completion_tokens,
        "total_tokens": ref.prompt_tokens + ref.completion_tokens,
    }

    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=stream_body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == text
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == [answer["choices"][0]["finish_reason"]]
    assert chunks[-1]["usage"] == answer["usage"]


def test_streamed_completion_equals_whole(base_url):
    body = {"model": "chatty", "prompt": "the quick brown", "max_tokens": 16, "temperature": 0}
    whole = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).json()
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == whole["choices"][0]["text"]
    assert whole["object"] == "text_completion" and whole["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("model", [BASE, "chatty@1"])
def test_openai_sdk_completions_chat_and_streams_equal_the_engine(base_url, engine, model):
    """The stock `openai` client: whole and streamed completions and chat, greedy, equal the engine's."""
    import openai

    from serving.engine.sampling import SamplingParams

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    adapter = None if model == BASE else "chatty"
    params = SamplingParams(max_tokens=12, temperature=0)

    want = engine.generate(["the quick brown"], adapter, params)[0]
    whole = client.completions.create(model=model, prompt="the quick brown", max_tokens=12, temperature=0)
    assert whole.choices[0].text == want.text and whole.usage.completion_tokens == want.completion_tokens
    stream = client.completions.create(model=model, prompt="the quick brown", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == want.text

    want_chat = engine.generate([engine.apply_chat_template(MESSAGES)], adapter, params)[0]
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == want_chat.text
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat.text
    assert chunks[-1].usage.completion_tokens == want_chat.completion_tokens

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", max_tokens=0)


def test_seeded_sampling_is_reproducible(base_url):
    body = {"model": BASE, "prompt": ["hello", "the lazy dog"], "max_tokens": 12, "temperature": 0.9, "seed": 42}
    a = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).json()
    b = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1]


def test_client_disconnect_mid_stream_leaves_replica_healthy(base_url):
    body = {"model": "chatty", "messages": MESSAGES, "max_tokens": 200, "temperature": 1.0, "seed": 1, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        next(lines)
        next(lines)  # the role chunk and one more line, then hang up
    for _ in range(2):
        r = httpx.post(
            f"{base_url}/v1/chat/completions",
            json={"model": "chatty", "messages": MESSAGES, "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    metrics = httpx.get(f"{base_url}/metrics", timeout=30).text
    assert 'route="/v1/chat/completions",status="499"' in metrics  # recorded as a client hang-up
    assert "capaserve_time_to_first_token_seconds_count" in metrics
    assert "capaserve_generated_tokens_total" in metrics


ERROR_CASES = [
    ("embeddings on a causal LM", "/v1/embeddings", {"model": BASE, "input": "x"}, 400),
    ("prompt longer than the context", "/v1/completions", {"model": BASE, "prompt": "hello " * 400, "max_tokens": 4}, 400),
    ("streamed prompt too long", "/v1/completions", {"model": BASE, "prompt": "hello " * 400, "stream": True}, 400),
    ("n > 1", "/v1/completions", {"model": BASE, "prompt": "x", "n": 2}, 400),
    ("unknown adapter", "/v1/chat/completions", {"model": "nope", "messages": MESSAGES}, 404),
]


@pytest.mark.parametrize("name,path,body,status", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_generation_errors(base_url, name, path, body, status):
    r = httpx.post(f"{base_url}{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    error_of(r)


def test_streams_cut_by_a_killed_replica_end_with_an_error_event(base_url):
    """kill -9 of the model replica while streams run: a stream that already answered 200
    ends with an error event and [DONE], never with a cut connection (docs/http-api.md)."""
    body = {"model": "chatty", "messages": MESSAGES, "max_tokens": 200, "temperature": 1.0, "seed": 1, "stream": True}
    started = threading.Barrier(9, timeout=60)
    ends: list[list[str] | BaseException] = []

    def stream() -> None:
        try:
            with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as resp:
                assert resp.status_code == 200
                lines = (line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: "))
                events = [next(lines)]
                started.wait()
                events += list(lines)
            ends.append(events)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            ends.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait()  # eight streams have sent their first event (one engine runs them in turn)
    (replica,) = model_replica_pids(os.getpid())
    os.kill(replica, signal.SIGKILL)
    for t in threads:
        t.join(timeout=90)
    assert len(ends) == 8 and not [e for e in ends if isinstance(e, BaseException)], ends
    assert all(events[-1] == "[DONE]" for events in ends)  # every stream was ended, none cut
    cut = [json.loads(events[-2]) for events in ends if "error" in json.loads(events[-2])]
    assert cut, "no stream was still running when the replica was killed"
    for err in cut:
        assert set(err["error"]) == {"message", "type", "code"} and err["error"]["code"] >= 500
    deadline = time.monotonic() + 120  # the replacement replica is up before the module moves on
    while httpx.get(f"{base_url}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "no replacement replica"
        time.sleep(0.5)
