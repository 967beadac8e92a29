"""What a new user sends by mistake, over real HTTP: the real app and the real deployment class
(no Ray) under uvicorn on 127.0.0.1. Each mistake gets a 400/404 that says what is wrong, and
what OpenAI's API accepts is accepted (a JSON body whatever its content type)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import uvicorn

from adapters.bundle import Task, save_bundle
from adapters.synthetic import random_bundle
from tests.conftest import MINILM_ID
from tests.serve_helpers import error_of, free_port

PNG_URL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA"


@pytest.fixture(scope="module")
def engine():
    from serving.config import EngineConfig
    from serving.engine.engine import Engine

    return Engine(EngineConfig(num_threads=1))


@pytest.fixture(scope="module")
def base(engine, tmp_path_factory):
    """The app on a free port; a classifier `sentiment` uploaded twice, version 1 then deleted."""
    from serving.config_sources import config_of
    from serving.deployments import ModelServer
    from serving.ingress import _build_context, create_api
    from tests.serve_helpers import DirectClient

    args = config_of(registry=str(tmp_path_factory.mktemp("registry")), max_batch_size=8)
    server = ModelServer(args, engine=engine)
    ctx, store, settings = _build_context(None, args)
    ctx.client = DirectClient(server)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_api(ctx, store, settings), host="127.0.0.1", port=port,
                                       log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    targets = [n for n in engine.spec.linear_shapes if n.endswith("attention.self.query")]
    folder = tmp_path_factory.mktemp("bundles")
    for seed in (1, 2):
        bundle = random_bundle(engine.spec, targets, seed=seed, task=Task.SEQUENCE_CLASSIFICATION, labels=["neg", "pos"])
        data = save_bundle(bundle, folder / f"s{seed}.safetensors").read_bytes()
        assert httpx.put(f"{url}/v1/adapters/sentiment", content=data, timeout=60).status_code == 201
    assert httpx.delete(f"{url}/v1/adapters/sentiment", params={"version": 1}, timeout=30).status_code in (200, 204)
    yield url
    uv.should_exit = True
    thread.join(timeout=30)
    asyncio.run(server.scheduler.close())


def post(base: str, path: str, body, **kw) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=60, **kw) if not isinstance(body, (bytes, str)) \
        else httpx.post(f"{base}{path}", content=body, timeout=60, **kw)


# ---------------------------------------------------------------------------- images on a text base


@pytest.mark.parametrize("path,model", [("/v1/classify", "sentiment"), ("/v1/embeddings", MINILM_ID)])
def test_image_data_url_on_a_text_base_is_400(base, path, model):
    r = post(base, path, {"model": model, "input": ["fine text", PNG_URL]})
    err = error_of(r)
    assert r.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["message"].startswith("input 1 is an image (a data:image/... URL)") and "takes text" in err["message"]


def test_a_url_string_is_text_on_a_text_base(base, engine):
    """Nothing is fetched: an http(s) URL is the text of the URL, as OpenAI and TEI embed it."""
    from tests.engine_utils import embed

    url = "http://example.com/cat.png"
    r = post(base, "/v1/embeddings", {"model": MINILM_ID, "input": [url]})
    assert r.status_code == 200, r.text
    want = embed(engine, [url])[0][0]
    got = r.json()["data"][0]["embedding"]
    assert max(abs(a - b) for a, b in zip(got, want.tolist(), strict=True)) < 1e-5
    assert post(base, "/v1/classify", {"model": "sentiment", "input": url}).status_code == 200


# ---------------------------------------------------------------------------- content types


def test_json_body_is_read_whatever_its_content_type(base):
    body = b'{"model": "%s", "input": ["hello"]}' % MINILM_ID.encode()
    answers = [post(base, "/v1/embeddings", body, headers={"content-type": ct}).json()["data"][0]["embedding"]
               for ct in ("application/json", "application/x-www-form-urlencoded", "text/plain")]
    assert answers[0] == answers[1] == answers[2]
    # no content type at all (httpx sends none for raw bytes without one)
    r = httpx.post(f"{base}/v1/classify", content=b'{"model": "sentiment", "input": "great"}', timeout=60)
    assert r.status_code == 200 and r.json()["data"][0]["label"] in ("neg", "pos")


def test_a_body_that_is_not_json_says_so_and_names_its_type(base):
    r = post(base, "/v1/embeddings", b"model=x&input=hello", headers={"content-type": "application/x-www-form-urlencoded"})
    msg = error_of(r)["message"]
    assert r.status_code == 400 and msg.startswith("the request body must be JSON")
    assert "application/x-www-form-urlencoded" in msg
    r = post(base, "/v1/classify", b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)["message"] == "the request body must be a JSON object; it is JSON but not an object (list)"
    r = post(base, "/v1/classify", b"", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "must be a JSON object (received content-type text/plain); it is empty" in error_of(r)["message"]
    # the raw upload route still takes its octet-stream body as bytes
    r = httpx.put(f"{base}/v1/adapters/junk", content=b"not a bundle", headers={"content-type": "text/plain"}, timeout=30)
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_adapter"


# ---------------------------------------------------------------------------- versions


@pytest.mark.parametrize("model,status,message", [
    ("sentiment@7", 404, "adapter sentiment@7 not found (versions: [2])"),
    ("sentiment@1", 404, "adapter sentiment@1 not found (versions: [2])"),  # deleted
    ("nobody", 404, "adapter 'nobody' not found"),
    ("sentiment@abc", 400, "invalid model 'sentiment@abc': version in 'sentiment@abc' must be a positive integer"),
    ("sentiment@0", 400, "invalid model 'sentiment@0': version in 'sentiment@0' must be a positive integer"),
])
def test_version_errors_keep_their_detail(base, model, status, message):
    r = post(base, "/v1/classify", {"model": model, "input": "great"})
    err = error_of(r)
    assert r.status_code == status and message in err["message"], err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert post(base, "/v1/classify", {"model": "sentiment@2", "input": "great"}).status_code == 200


# ---------------------------------------------------------------------------- empty input


@pytest.mark.parametrize("path,model", [("/v1/classify", "sentiment"), ("/v1/embeddings", MINILM_ID)])
@pytest.mark.parametrize("value,message", [
    ("", "input: must not be an empty string"),
    ([""], "input: item 0 is an empty string; every input needs at least one character"),
    (["a", "", ""], "input: item 1 is an empty string; every input needs at least one character (2 are empty)"),
    ([], "input: must hold at least one item"),
])
def test_empty_input_is_400_without_pydantic_prefix(base, path, model, value, message):
    r = post(base, path, {"model": model, "input": value})
    assert r.status_code == 400 and error_of(r)["message"] == message, r.text
    assert "Value error" not in r.text


def test_base_created_is_stable(base):
    first = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]
    time.sleep(1.1)  # a new second: a per-call timestamp would differ
    second = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]
    assert first["id"] == MINILM_ID and first["created"] == second["created"] <= int(time.time())


def _swapped(base: str, adapter: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "capaserve_adapter_swapped_requests_total" and s.labels.get("adapter") == adapter)


def test_swapped_requests_are_counted_by_adapter(base):
    """One at a time: the base, then the adapter twice: only the first of those swaps."""
    assert post(base, "/v1/embeddings", {"model": MINILM_ID, "input": "x"}).status_code == 200
    before = _swapped(base, "sentiment"), _swapped(base, "base")
    for _ in range(2):
        assert post(base, "/v1/classify", {"model": "sentiment", "input": "great"}).status_code == 200
    assert _swapped(base, "sentiment") - before[0] == 1
    assert post(base, "/v1/embeddings", {"model": MINILM_ID, "input": "x"}).status_code == 200
    assert _swapped(base, "base") - before[1] == 1  # back to the base is a swap too
