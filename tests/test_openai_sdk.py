"""The official `openai` Python SDK, unchanged, against a real capaserve app on 127.0.0.1.

The SDK's default embeddings call asks for `encoding_format="base64"`; it must decode to
the same vectors an in-process Engine computes. Errors must map to the SDK's own
exception classes (404 NotFoundError, 400 BadRequestError, 401 AuthenticationError).
Completions, chat and streaming through the SDK are in test_serve_generate.py.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from adapters.bundle import Task, save_bundle
from adapters.synthetic import random_bundle
from tests.conftest import MINILM_ID
from tests.engine_utils import embed
from tests.serve_helpers import running_app

pytestmark = pytest.mark.ray

KEY = "sdk-key"
TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a"]


@pytest.fixture(scope="module")
def engine():
    from serving.config import EngineConfig
    from serving.engine.engine import Engine

    return Engine(EngineConfig(num_threads=1, dtype="float32"))


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, engine):
    spec = engine.spec
    targets = [n for n in spec.linear_shapes if n.endswith("attention.self.query")]
    bundle = random_bundle(spec, targets, seed=7, task=Task.FEATURE_EXTRACTION, std=0.1)
    path = save_bundle(bundle, tmp_path_factory.mktemp("b") / "sdk-fe.safetensors")
    engine.load_adapter("sdk-fe", bundle)
    args = {"registry": str(tmp_path_factory.mktemp("registry")), "replicas": 1, "num_cpus": 1,
            "api_keys": KEY, "admin_token": "sdk-admin"}
    with running_app(args, num_cpus=2) as base:
        r = httpx.put(f"{base}/v1/adapters/sdk-fe", content=path.read_bytes(), timeout=60,
                      headers={"Authorization": "Bearer sdk-admin"})
        assert r.status_code == 201, r.text
        yield base


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.mark.parametrize("model", [MINILM_ID, "sdk-fe", "sdk-fe@1"])
def test_default_embeddings_call_decodes_to_engine_vectors(client, engine, model):
    res = client.embeddings.create(model=model, input=TEXTS)  # the SDK's default: base64 on the wire
    got = np.array([d.embedding for d in res.data], dtype=np.float32)
    want = embed(engine, TEXTS, None if model == MINILM_ID else "sdk-fe").embeddings.numpy()
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert res.usage.prompt_tokens == res.usage.total_tokens == engine.count_tokens(TEXTS)


def test_base64_is_little_endian_float32_and_usage_has_no_completion_tokens(base_url, engine):
    body = {"model": MINILM_ID, "input": TEXTS[:2], "encoding_format": "base64", "user": "someone"}
    r = httpx.post(f"{base_url}/v1/embeddings", json=body, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out["usage"]) == {"prompt_tokens", "total_tokens"}
    want = embed(engine, TEXTS[:2]).embeddings.numpy()
    for d, row in zip(out["data"], want):
        raw = base64.b64decode(d["embedding"])
        assert len(raw) == 384 * 4
        np.testing.assert_allclose(np.frombuffer(raw, dtype="<f4"), row, atol=1e-5)


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_dimensions_truncate_then_renormalise(client, engine, encoding):
    res = client.embeddings.create(model=MINILM_ID, input=TEXTS, dimensions=64, encoding_format=encoding)
    full = embed(engine, TEXTS).embeddings.numpy()
    want = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    if encoding == "base64":
        got = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in res.data])
    else:
        got = np.array([d.embedding for d in res.data])
    assert got.shape == (3, 64)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_models_list(client):
    ids = {m.id for m in client.models.list().data}
    assert {MINILM_ID, "sdk-fe"} <= ids


def test_errors_map_to_sdk_exceptions(client, base_url):
    with pytest.raises(openai.NotFoundError) as nf:
        client.embeddings.create(model="no-such-adapter", input="x")
    assert nf.value.status_code == 404
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MINILM_ID, input="x", dimensions=385)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MINILM_ID, input=[])
    with pytest.raises(openai.BadRequestError):  # an encoder cannot complete
        client.completions.create(model=MINILM_ID, prompt="hi")
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model=MINILM_ID, input="x")
