"""Request limits (docs/http-api.md#limits), in process: refused before any replica call, with the error body.

The same limits through real Ray Serve, on both ports and at sizes over gRPC's 4 MiB
default, are in tests/test_big_requests.py.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from pydantic import BaseModel

from adapters.bundle import save_bundle
from adapters.synthetic import random_bundle
from serving.api.body_limit import BodyLimit
from tests.conftest import MINILM_ID
from tests.serve_helpers import error_of, in_process_app


@pytest.fixture(scope="module")
def engine():
    from serving.config import EngineConfig
    from serving.engine.engine import Engine

    return Engine(EngineConfig(num_threads=1))


def make_app(engine, registry, **kw):
    """The in-process app, its model server counting the calls that reach it: a refused request makes none."""
    app, server, _ = in_process_app(engine, registry=str(registry), **kw)
    server.calls = 0
    for method in ("embed", "classify", "call_many", "generate", "generate_stream"):
        real = getattr(server, method)

        def counted(*args, _real=real, **kwargs):
            server.calls += 1
            return _real(*args, **kwargs)

        setattr(server, method, counted)
    return app, server


def test_limits_refuse_before_any_replica_call(engine, tmp_path):
    app, server = make_app(
        engine, tmp_path / "reg", max_body_bytes=64 * 1024, max_inputs=8, max_input_chars=1000, max_upload_bytes=1 << 20
    )
    bundle = random_bundle(engine.spec, ["encoder.layer.0.attention.self.query"], rank=32, seed=3)
    data = save_bundle(bundle, tmp_path / "a.safetensors").read_bytes()
    assert 64 * 1024 < len(data) < 1 << 20  # an upload: over the body limit, within the upload limit

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://capaserve") as c:
            ok = await c.post("/v1/embeddings", json={"model": MINILM_ID, "input": ["x" * 1000] * 8})
            assert ok.status_code == 200 and len(ok.json()["data"]) == 8
            calls = server.calls
            assert calls > 0  # the counter sees what reaches the replica

            # Content-Length over the limit: 413 without reading the body
            read = 0

            async def announced():
                nonlocal read
                yield b'{"model": "%s", "input": "' % MINILM_ID.encode()
                for _ in range(8):
                    read += 16384
                    yield b"y" * 16384
                yield b'"}'

            length = str(64 * 1024 + 100)
            r = await c.post("/v1/embeddings", content=announced(), headers={"content-type": "application/json", "content-length": length})
            assert r.status_code == 413 and error_of(r)["type"] == "payload_too_large", r.text
            assert "65536" in error_of(r)["message"] and read == 0, read  # refused from the header alone

            # no Content-Length (chunked): 413 once the bytes received pass the limit
            sent = 0

            async def chunks():
                nonlocal sent
                yield b'{"model": "%s", "input": "' % MINILM_ID.encode()
                for _ in range(1000):  # 16 MB offered; reading stops at the limit
                    sent += 16384
                    yield b"z" * 16384

            r = await c.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413 and error_of(r)["type"] == "payload_too_large", r.text
            assert sent < 200 * 1024, sent

            # too many inputs, one input too long: 400 naming the bound
            r = await c.post("/v1/embeddings", json={"model": MINILM_ID, "input": ["a"] * 9})
            assert r.status_code == 400 and "at most 8" in error_of(r)["message"]
            r = await c.post("/v1/embeddings", json={"model": MINILM_ID, "input": ["ok", "w" * 1001]})
            assert r.status_code == 400 and "input 1 has 1001 characters" in error_of(r)["message"]
            r = await c.post("/v1/completions", json={"model": MINILM_ID, "prompt": ["p"] * 9})
            assert r.status_code == 400 and "at most 8" in error_of(r)["message"]
            r = await c.post("/v1/chat/completions", json={"model": MINILM_ID, "messages": [{"role": "user", "content": "m" * 1001}]})
            assert r.status_code == 400 and "messages 0 has 1001 characters" in error_of(r)["message"]
            assert server.calls == calls, "a refused request reached the model replica"

            # uploads keep their own limit
            r = await c.put("/v1/adapters/a", content=data)
            assert r.status_code == 201, r.text
            r = await c.put("/v1/adapters/b", content=data + b"\0" * (1 << 20))
            assert r.status_code == 413
        await server.scheduler.close()

    asyncio.run(main())


def test_default_char_bound_follows_the_model(engine, tmp_path):
    """Without max_input_chars, the bound is 64 characters per token of the model's longest sequence."""
    app, server = make_app(engine, tmp_path / "reg")
    bound = 64 * engine.max_len

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://capaserve") as c:
            r = await c.post("/v1/embeddings", json={"model": MINILM_ID, "input": "q" * (bound + 1)})
            assert r.status_code == 400 and f"at most {bound} per input" in error_of(r)["message"], r.text
            # within the bound but over the token limit: the replica's token check answers
            r = await c.post("/v1/embeddings", json={"model": MINILM_ID, "input": "word " * 600})
            assert r.status_code == 400 and "tokens" in error_of(r)["message"], r.text
        await server.scheduler.close()

    asyncio.run(main())


def test_body_limit_passes_what_fits():
    """The middleware alone: a body at the limit reaches the app whole, one byte more does not."""
    seen: list[bytes] = []

    async def app(scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = BodyLimit(app, limit=10)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=limited), base_url="http://t") as c:
            assert (await c.post("/v1/embeddings", content=b"0123456789")).status_code == 200
            assert (await c.post("/v1/embeddings", content=b"0123456789a")).status_code == 413

    asyncio.run(main())
    assert seen == [b"0123456789"]


class _Body(BaseModel):
    input: str


def test_a_refused_body_is_freed_at_once():
    """What a FastAPI route read of a streamed body before the 413 is freed with the request, not
    left in reference cycles until the cyclic GC runs (three refusals kept ~93 MiB in a replica)."""
    import gc
    import tracemalloc

    from fastapi import FastAPI

    fastapi_app = FastAPI()

    @fastapi_app.post("/v1/embeddings")
    async def route(body: _Body) -> dict:
        return {}

    limit = 4 * 1024 * 1024

    async def body():
        for _ in range(80):
            yield b"x" * 65536  # 5 MiB in all

    async def main():
        limited = BodyLimit(fastapi_app, limit=limit)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=limited), base_url="http://t") as c:
            for _ in range(3):
                r = await c.post("/v1/embeddings", content=body(), headers={"Content-Type": "application/json"})
                assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large", r.text

    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        asyncio.run(main())
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    assert peak > limit  # the body was read up to the limit...
    assert held < limit / 4, f"{held / 2**20:.1f} MiB of the refused bodies still held"  # ...and let go
