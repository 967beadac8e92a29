"""The FastAPI app and the model shim in one process (no Ray): auth and overload mapping.

`ModelServer` is the real deployment class with a real engine; `DirectClient` calls its
methods as the Ray handle would, so these run in seconds.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from adapters.bundle import save_bundle
from adapters.synthetic import random_bundle
from serving.config_sources import config_of
from serving.deployments import ModelServer
from serving.ingress import _build_context, create_api
from tests.conftest import MINILM_ID
from tests.serve_helpers import DirectClient, error_of


@pytest.fixture(scope="module")
def engine():
    from serving.config import EngineConfig
    from serving.engine.engine import Engine

    return Engine(EngineConfig(num_threads=1))


def make_app(engine, registry, **kw):
    args = config_of(registry=str(registry), **kw)
    server = ModelServer(args, engine=engine)
    ctx, store, settings = _build_context(None, args)
    ctx.client = DirectClient(server)
    return create_api(ctx, store, settings), server


async def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://capaserve")


def test_api_keys_and_admin_token(engine, tmp_path):
    app, server = make_app(engine, tmp_path / "reg", api_keys="k1,k2", admin_token="admin")
    bundle = random_bundle(engine.spec, ["encoder.layer.0.attention.self.query"], seed=5)
    data = save_bundle(bundle, tmp_path / "a.safetensors").read_bytes()
    body = {"model": MINILM_ID, "input": "hi"}

    async def main():
        async with await _client(app) as c:
            r = await c.post("/v1/embeddings", json=body)
            assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
            r = await c.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401 and "not valid" in error_of(r)["message"]
            error_of(r)
            r = await c.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer k2"})
            assert r.status_code == 200
            r = await c.put("/v1/adapters/a", content=data, headers={"Authorization": "Bearer k1"})
            assert r.status_code == 403
            r = await c.put("/v1/adapters/a", content=data, headers={"Authorization": "Bearer admin"})
            assert r.status_code == 201
            r = await c.post("/v1/embeddings", json={**body, "model": "a"}, headers={"Authorization": "Bearer k1"})
            assert r.status_code == 200 and r.json()["model"] == "a"
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/readyz")).status_code == 200
        await server.scheduler.close()

    asyncio.run(main())


def test_full_queue_answers_503(engine, tmp_path):
    app, server = make_app(engine, tmp_path / "reg", max_queue=1, max_batch_size=1)

    async def main():
        async with await _client(app) as c:
            body = {"model": MINILM_ID, "input": ["some text to embed"] * 8}
            rs = await asyncio.gather(*(c.post("/v1/embeddings", json=body) for _ in range(6)))
        await server.scheduler.close()
        return rs

    rs = asyncio.run(main())
    codes = sorted(r.status_code for r in rs)
    assert 200 in codes and 503 in codes, codes
    assert error_of(next(r for r in rs if r.status_code == 503))["type"] == "overloaded_error"


def test_undecodable_text_is_400_and_spares_its_batch(engine, tmp_path):
    """Found by tests/test_api_fuzz.py: a body that is not UTF-8 was a 500, and a lone
    surrogate ("\\ud800", valid JSON) in a text was a 500 for every request of its batch."""
    app, server = make_app(engine, tmp_path / "reg", max_batch_size=8, batch_wait_ms=50)
    json_type = {"content-type": "application/json"}

    async def main():
        async with await _client(app) as c:
            r = await c.post("/v1/embeddings", content=b'{"model": "\xff\xfe"}', headers=json_type)
            assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
            bad = b'{"model": "%s", "input": ["ok", "a\\ud800b"]}' % MINILM_ID.encode()
            good = {"model": MINILM_ID, "input": ["fine text"]}
            rs = await asyncio.gather(
                c.post("/v1/embeddings", content=bad, headers=json_type),
                c.post("/v1/embeddings", json=good),
                c.post("/v1/chat/completions", content=b'{"model": "m", "messages": [{"role": "user", "content": "\\udc00"}]}',
                       headers=json_type),
            )
        await server.scheduler.close()
        return rs

    bad, good, chat = asyncio.run(main())
    assert bad.status_code == 400 and "not valid Unicode" in error_of(bad)["message"], bad.text
    assert good.status_code == 200, good.text
    assert chat.status_code == 400 and "messages.0.content" in error_of(chat)["message"], chat.text
