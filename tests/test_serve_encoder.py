"""The Ray Serve app on the embedded MiniLM, through real Ray Serve and real HTTP.

One app per module (two replicas, fewer adapter slots than adapters, so the multiplexer
evicts and reloads under load); answers are compared with an in-process Engine and,
for the base, with sentence-transformers.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from adapters.bundle import Task, save_bundle
from adapters.synthetic import random_bundle
from tests.conftest import MINILM_ID
from tests.engine_utils import classify, embed
from tests.serve_helpers import APP_NAME, error_of, running_app

pytestmark = pytest.mark.ray

FE_ADAPTERS = ["fe-a", "fe-b", "fe-c"]
CLS_ADAPTERS = ["cls-a", "cls-b", "cls-c"]
TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "capaboost merges masked low-rank updates into the base weights before serving",
    "a",
    "serving many adapters from one base model over http on ray serve, grouped by adapter",
    "short text",
]


@pytest.fixture(scope="module")
def engine():
    from serving.config import EngineConfig
    from serving.engine.engine import Engine

    return Engine(EngineConfig(num_threads=1, dtype="float32"))


@pytest.fixture(scope="module")
def bundles(engine, tmp_path_factory) -> dict[str, Path]:
    """Six synthetic adapters on the served base, saved as bundle files."""
    folder = tmp_path_factory.mktemp("bundles")
    spec = engine.spec
    targets = [n for n in spec.linear_shapes if n.endswith(("attention.self.query", "attention.self.value"))]
    out: dict[str, Path] = {}
    for i, name in enumerate(FE_ADAPTERS + CLS_ADAPTERS):
        task = Task.FEATURE_EXTRACTION if name in FE_ADAPTERS else Task.SEQUENCE_CLASSIFICATION
        bundle = random_bundle(spec, targets, seed=100 + i, task=task, std=0.1,
                               labels=["neg", "neu", "pos"] if task is Task.SEQUENCE_CLASSIFICATION else None)
        out[name] = save_bundle(bundle, folder / f"{name}.safetensors")
        engine.load_adapter(name, bundle)
    return out


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, bundles) -> str:
    args = {
        "registry": str(tmp_path_factory.mktemp("registry")),
        "replicas": 2,
        "num_cpus": 1,
        "max_adapters_per_replica": 4,
        "max_batch_size": 8,
        "batch_wait_ms": 5,
        "registry_poll_s": 0.3,
    }
    with running_app(args) as base:
        for name, path in bundles.items():
            r = httpx.put(f"{base}/v1/adapters/{name}", content=path.read_bytes(), timeout=60)
            assert r.status_code == 201, r.text
        yield base


def post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=60)


def test_base_embeddings_match_engine_and_sentence_transformers(base_url, engine, minilm_dir):
    from sentence_transformers import SentenceTransformer

    r = post(base_url, "/v1/embeddings", {"model": MINILM_ID, "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    assert body["usage"]["prompt_tokens"] == engine.count_tokens(TEXTS) == body["usage"]["total_tokens"]
    np.testing.assert_allclose(got, embed(engine, TEXTS).embeddings.numpy(), atol=1e-5)
    st = SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(got, st, atol=1e-4)


def test_adapter_embeddings_and_classify_match_engine(base_url, engine):
    r = post(base_url, "/v1/embeddings", {"model": "fe-a", "input": TEXTS[:3]})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]])
    np.testing.assert_allclose(got, embed(engine, TEXTS[:3], "fe-a").embeddings.numpy(), atol=1e-5)
    assert not np.allclose(got, embed(engine, TEXTS[:3]).embeddings.numpy(), atol=1e-3)  # the adapter matters

    r = post(base_url, "/v1/classify", {"model": "cls-b@1", "input": TEXTS[:3]})
    assert r.status_code == 200, r.text
    body = r.json()
    want = classify(engine, TEXTS[:3], "cls-b")
    assert body["object"] == "list" and body["model"] == "cls-b@1"
    assert [d["label"] for d in body["data"]] == want.labels
    np.testing.assert_allclose([d["probs"] for d in body["data"]], want.probs.numpy(), atol=1e-5)


def test_direct_ingress_serves_the_same_api(base_url):
    """The ingress replica's own server (Serve direct ingress) answers as the proxy does."""
    from serving.ray_local import direct_ingress_urls

    (direct,) = direct_ingress_urls(APP_NAME, "127.0.0.1")  # one ingress replica
    assert direct != base_url
    body = {"model": "fe-b", "input": TEXTS[:2]}
    via_proxy, via_direct = post(base_url, "/v1/embeddings", body), post(direct, "/v1/embeddings", body)
    assert via_proxy.status_code == via_direct.status_code == 200, via_direct.text
    np.testing.assert_allclose([d["embedding"] for d in via_direct.json()["data"]],
                               [d["embedding"] for d in via_proxy.json()["data"]], atol=1e-5)
    r = post(direct, "/v1/embeddings", {"model": "no-such-adapter", "input": "x"})
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"


def test_models_lists_base_and_adapters(base_url):
    r = httpx.get(f"{base_url}/v1/models", timeout=30)
    assert r.status_code == 200
    data = r.json()["data"]
    assert data[0]["id"] == MINILM_ID and data[0]["parent"] is None
    adapters = {d["id"]: d for d in data[1:]}
    assert set(adapters) == set(FE_ADAPTERS + CLS_ADAPTERS)
    assert all(d["parent"] == MINILM_ID for d in adapters.values())


def test_concurrent_mixed_requests_have_no_cross_adapter_contamination(base_url, engine):
    """120 concurrent requests over 6 adapters and the base, on 2 replicas holding 4 each."""
    rng = random.Random(7)
    models = [None] + FE_ADAPTERS + CLS_ADAPTERS
    jobs = []
    for i in range(120):
        model = rng.choice(models)
        texts = rng.sample(TEXTS, rng.randint(1, 3))
        kind = "classify" if model in CLS_ADAPTERS and rng.random() < 0.7 else "embeddings"
        jobs.append((kind, model, texts))

    refs: dict[tuple, np.ndarray] = {}
    for kind, model, texts in jobs:
        for t in texts:
            key = (kind, model, t)
            if key not in refs:
                if kind == "classify":
                    refs[key] = classify(engine, [t], model).probs.numpy()[0]
                else:
                    refs[key] = embed(engine, [t], model).embeddings.numpy()[0]

    async def fire():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
            async def one(kind, model, texts):
                body = {"model": model or MINILM_ID, "input": texts}
                return await client.post(f"/v1/{kind}", json=body)

            return await asyncio.gather(*(one(*j) for j in jobs))

    responses = asyncio.run(fire())  # each request bounded by the client's 120 s timeout
    for (kind, model, texts), r in zip(jobs, responses):
        assert r.status_code == 200, (model, r.text)
        for t, d in zip(texts, r.json()["data"]):
            got = np.array(d["probs"] if kind == "classify" else d["embedding"])
            np.testing.assert_allclose(got, refs[(kind, model, t)], atol=1e-4, err_msg=f"{kind} {model} {t!r}")


ERROR_CASES = [
    ("unknown model", "/v1/embeddings", {"model": "no-such-adapter", "input": "x"}, 404),
    ("unknown version", "/v1/embeddings", {"model": "fe-a@99", "input": "x"}, 404),
    ("chat on an encoder", "/v1/chat/completions", {"model": MINILM_ID, "messages": [{"role": "user", "content": "hi"}]}, 400),
    ("completion on an encoder adapter", "/v1/completions", {"model": "fe-a", "prompt": "hi"}, 400),
    ("classify on the base", "/v1/classify", {"model": MINILM_ID, "input": "x"}, 400),
    ("classify on a feature adapter", "/v1/classify", {"model": "fe-b", "input": "x"}, 400),
    ("missing input", "/v1/embeddings", {"model": MINILM_ID}, 400),
    ("empty input list", "/v1/embeddings", {"model": MINILM_ID, "input": []}, 400),
]


@pytest.mark.parametrize("name,path,body,status", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_have_spec_body(base_url, name, path, body, status):
    r = post(base_url, path, body)
    assert r.status_code == status, r.text
    error_of(r)


def test_bad_json_is_400_with_spec_body(base_url):
    r = httpx.post(f"{base_url}/v1/embeddings", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "JSON" in error_of(r)["message"] or "json" in error_of(r)["message"]
    r = httpx.get(f"{base_url}/v1/nothing-here")
    assert r.status_code == 404
    error_of(r)


def test_new_version_and_delete_reach_every_replica(base_url, engine, bundles, tmp_path):
    from ray import serve

    spec = engine.spec
    targets = [n for n in spec.linear_shapes if n.endswith("attention.self.key")]
    v2 = random_bundle(spec, targets, seed=999, std=0.1)
    path = save_bundle(v2, tmp_path / "fe-a-v2.safetensors")
    r = httpx.put(f"{base_url}/v1/adapters/fe-a", content=path.read_bytes(), timeout=60)
    assert r.status_code == 201 and r.json()["version"] == 2
    engine.load_adapter("fe-a-v2", v2)
    r = post(base_url, "/v1/embeddings", {"model": "fe-a", "input": TEXTS[:2]})
    np.testing.assert_allclose(
        [d["embedding"] for d in r.json()["data"]], embed(engine, TEXTS[:2], "fe-a-v2").embeddings.numpy(), atol=1e-5
    )
    assert post(base_url, "/v1/embeddings", {"model": "fe-a@1", "input": "x"}).status_code == 200

    assert httpx.delete(f"{base_url}/v1/adapters/fe-a", timeout=30).status_code == 204
    for model in ("fe-a", "fe-a@1", "fe-a@2"):
        r = post(base_url, "/v1/embeddings", {"model": model, "input": "x"})
        assert r.status_code == 404, r.text
        error_of(r)
    handle = serve.get_deployment_handle("CapaserveModel", app_name=APP_NAME)
    deadline = time.monotonic() + 15
    while True:
        held = set()
        for _ in range(8):  # requests spread over both replicas
            held |= set(handle.loaded_adapters.remote().result(timeout_s=30))
        if not any(h.startswith("fe-a@") for h in held):
            break
        assert time.monotonic() < deadline, f"deleted adapter still loaded: {held}"
        time.sleep(0.3)


Sample = tuple[str, tuple[tuple[str, str], ...]]


def scrape(base: str) -> dict[Sample, float]:
    """Every capaserve_* sample of GET /metrics, read with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{base}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[Sample, float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if s.name.startswith("capaserve_"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def moved(before: dict[Sample, float], after: dict[Sample, float], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Non-zero increase of each series of `name` between two scrapes: labels (as a tuple) -> delta."""
    return {labels: v - before.get((n, labels), 0.0) for (n, labels), v in after.items()
            if n == name and v != before.get((n, labels), 0.0)}


def by_replica(scraped: dict[Sample, float], name: str) -> dict[str, float]:
    return {dict(labels)["replica"]: v for (n, labels), v in scraped.items() if n == name}


def test_metrics_after_traffic(base_url, engine, tmp_path):
    """Sequential traffic of its own (two fresh adapters uploaded here, the base, a 404 and a
    400) moves the ingress metrics by exactly what was sent: requests and latency counts per
    (route, adapter label, status), adapter labels without the version, prompt tokens equal
    to the in-process engine's token count, latency sums within the client's own timings.
    Replica reports add one size-1 batch per served request, one swap-latency observation
    per counted swap, at least one load per fresh adapter (at most one per replica), and
    gauges holding at least the fresh adapters' bytes computed from their shapes."""
    spec = engine.spec
    targets = [n for n in spec.linear_shapes if n.endswith(("attention.self.query", "attention.self.value"))]
    fresh = {
        "metrics-fe": random_bundle(spec, targets, seed=501, task=Task.FEATURE_EXTRACTION, std=0.1),
        "metrics-cls": random_bundle(spec, targets, seed=502, task=Task.SEQUENCE_CLASSIFICATION, std=0.1,
                                     labels=["neg", "pos"]),
    }
    before = scrape(base_url)
    assert scrape(base_url) == before  # scraping is not metered and moves nothing
    for name, bundle in fresh.items():
        r = httpx.put(f"{base_url}/v1/adapters/{name}", content=save_bundle(bundle, tmp_path / f"{name}.st").read_bytes(),
                      timeout=60)
        assert r.status_code == 201 and r.json()["version"] == 1, r.text

    plan = [  # (route, model, texts, status, adapter label)
        ("/v1/embeddings", MINILM_ID, TEXTS[:2], 200, "base"),
        ("/v1/embeddings", "metrics-fe", TEXTS[3:6], 200, "metrics-fe"),
        ("/v1/embeddings", "metrics-fe@1", TEXTS[:1], 200, "metrics-fe"),
        ("/v1/classify", "metrics-cls", TEXTS[1:4], 200, "metrics-cls"),
        ("/v1/embeddings", MINILM_ID, TEXTS[2:3], 200, "base"),
        ("/v1/classify", "metrics-cls@1", TEXTS[4:], 200, "metrics-cls"),
        ("/v1/embeddings", MINILM_ID, TEXTS[5:], 200, "base"),
        ("/v1/embeddings", "metrics-missing", ["x"], 404, "unknown"),
        ("/v1/classify", MINILM_ID, ["x"], 400, "base"),
    ]
    want_requests: dict[tuple, float] = {(("adapter", "none"), ("route", "/v1/adapters"), ("status", "201")): 2.0}
    want_tokens: dict[tuple, float] = {}
    client_s: dict[tuple, float] = {}
    for route, model, texts, status, label in plan:
        t0 = time.perf_counter()
        r = post(base_url, route, {"model": model, "input": texts})
        took = time.perf_counter() - t0
        assert r.status_code == status, r.text
        req = (("adapter", label), ("route", route), ("status", str(status)))
        want_requests[req] = want_requests.get(req, 0.0) + 1
        client_s[req] = client_s.get(req, 0.0) + took
        if status == 200:
            tokens = engine.count_tokens(texts)
            assert r.json()["usage"]["prompt_tokens"] == tokens
            tok = (("adapter", label), ("route", route))
            want_tokens[tok] = want_tokens.get(tok, 0.0) + tokens
    served = sum(1 for p in plan if p[3] == 200)
    after = scrape(base_url)

    assert moved(before, after, "capaserve_requests_total") == want_requests
    assert moved(before, after, "capaserve_request_latency_seconds_count") == want_requests
    assert moved(before, after, "capaserve_prompt_tokens_total") == want_tokens
    for name in ("capaserve_generated_tokens_total", "capaserve_time_to_first_token_seconds_count"):
        assert moved(before, after, name) == {}, name
    buckets = moved(before, after, "capaserve_request_latency_seconds_bucket")
    for req, n in want_requests.items():
        le = {float(dict(labels)["le"]): d for labels, d in buckets.items() if set(req) <= set(labels)}
        assert le[math.inf] == n
        counts = [le.get(b, 0.0) for b in sorted(le)]
        assert counts == sorted(counts) and all(c <= n for c in counts), (req, le)
        secs = moved(before, after, "capaserve_request_latency_seconds_sum")[req]
        if req in client_s:
            assert 0 < secs <= client_s[req], (req, secs, client_s[req])  # server time within the client's

    # replica reports: every served request ran alone (sequential), in a batch of 1
    assert moved(before, after, "capaserve_batch_size_requests_count") == {(): served}
    assert moved(before, after, "capaserve_batch_size_requests_sum") == {(): served}
    assert moved(before, after, "capaserve_batch_size_requests_bucket")[(("le", "1.0"),)] == served
    swaps = sum(moved(before, after, "capaserve_adapter_swaps_total").values())
    misses = sum(moved(before, after, "capaserve_adapter_cache_misses_total").values())
    hits = sum(moved(before, after, "capaserve_adapter_cache_hits_total").values())
    evictions = sum(moved(before, after, "capaserve_adapter_cache_evictions_total").values())
    assert moved(before, after, "capaserve_adapter_swap_latency_seconds_count") == {(): swaps}
    assert moved(before, after, "capaserve_adapter_swap_latency_seconds_sum")[()] > 0
    assert len(fresh) <= misses <= 2 * len(fresh)  # each fresh adapter loaded once per replica at most
    assert len(fresh) <= swaps <= served + misses  # a fresh adapter must be written; <= one per batch (+ unload)
    assert hits >= 4 and 0 <= evictions <= misses  # 4 adapter requests; an eviction only makes room for a load

    replicas = set(by_replica(after, "capaserve_adapter_swaps_total"))
    assert 1 <= len(replicas) <= 2  # the module's two replicas
    for name in ("capaserve_adapter_cache_hits_total", "capaserve_adapter_cache_bytes", "capaserve_loaded_adapters",
                 "capaserve_queue_depth_requests", "capaserve_adapter_mode_switches_total"):
        assert set(by_replica(after, name)) == replicas, name
    assert sum(moved(before, after, "capaserve_adapter_mode_switches_total").values()) <= len(replicas)
    for rep in replicas:  # one-hot mode gauge
        modes = {dict(labels)["mode"]: v for (n, labels), v in after.items()
                 if n == "capaserve_adapter_mode" and dict(labels)["replica"] == rep}
        assert sorted(modes) == ["merged", "mixed"] and sorted(modes.values()) == [0.0, 1.0], (rep, modes)
    least = sum(sum((f.out_features + f.in_features) * b.metadata.rank * b.metadata.num_copies * 4
                    for f in b.targets.values()) + sum(t.numel() * 4 for t in b.head.values()) for b in fresh.values())
    assert sum(by_replica(after, "capaserve_adapter_cache_bytes").values()) >= least  # factors form at least
    assert sum(by_replica(after, "capaserve_loaded_adapters").values()) >= len(fresh)
