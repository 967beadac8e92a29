"""Bad input, fuzzed, through the real app in process (real engine, real registry folder):

* an image cut at every byte offset of a small PNG and a JPEG, and seeded random byte flips,
  sent to /v1/classify and /v1/embeddings of an image base: always an answer below 500, and
  every 4xx carries the error body;
* adapter names with `..`, `%2F`, unicode look-alikes, upper case, empty segments and three
  segments on every name route: refused (400/404), or resolved to a name the key may see,
  never to another tenant's adapter and never a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random

import httpx
from PIL import Image

from adapters.bundle import save_bundle
from adapters.registry.backends import open_store
from adapters.registry.keys import KeyStore, Role
from adapters.synthetic import random_bundle
from tests.serve_helpers import error_of, in_process_app
from tests.test_images import VIT_ID, bundles, vit  # noqa: F401 - fixtures
from tests.test_ingress_inprocess import engine  # noqa: F401 - fixture


def _encoded(fmt: str) -> bytes:
    img = Image.new("RGB", (6, 5))
    img.putdata([(i * 7 % 256, i * 13 % 256, i * 29 % 256) for i in range(30)])
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def _url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _cases() -> list[str]:
    rng = random.Random(28)
    urls = []
    for fmt, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        data = _encoded(fmt)
        urls += [_url(mime, data[:n]) for n in range(len(data) + 1)]
        for _ in range(150):
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            urls.append(_url(mime, bytes(flipped)))
    return urls


def test_cut_and_flipped_images_are_never_5xx(vit, bundles, tmp_path):  # noqa: F811
    app, server, _ = in_process_app(vit, registry=str(tmp_path / "reg"))
    urls = _cases()
    birds = save_bundle(bundles["birds"], tmp_path / "birds.safetensors").read_bytes()

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://capaserve") as c:
            assert (await c.put("/v1/adapters/birds", content=birds)).status_code == 201
            out = []
            for i, url in enumerate(urls):
                path = "/v1/embeddings" if i % 2 else "/v1/classify"
                model = VIT_ID if path == "/v1/embeddings" else "birds"
                out.append(await c.post(path, json={"model": model, "input": [url]}))
        await server.scheduler.close()
        return out

    responses = asyncio.run(main())
    assert len(responses) > 600
    codes = [r.status_code for r in responses]
    assert max(codes) < 500, [r.text for r in responses if r.status_code >= 500][:3]
    for r in responses:
        if r.status_code >= 400:
            error_of(r)
    assert codes.count(400) > 500  # most cuts and flips are refused, not silently read


#: (name as sent in the path or `model`, what a key of tenant `a` may get): "own" resolves to a/x,
#: "refused" is a 400 or 404 that names nothing of `b`.
NAMES = {
    "a/x": "own",
    "a%2Fx": "own",
    "b/y": "refused",
    "b%2Fy": "refused",
    "b%2fy": "refused",
    "..": "refused",
    "a/..": "refused",
    "../b/y": "refused",
    "a/../b/y": "refused",
    "a%2F..%2Fb%2Fy": "refused",
    "B/y": "refused",
    "A/x": "refused",
    "\u0430/x": "refused",  # Cyrillic a
    "b\u2215y": "refused",  # division slash
    "b\uff0fy": "refused",  # fullwidth solidus
    "a//x": "refused",
    "/b/y": "refused",
    "a/": "refused",
    "a/x/y": "refused",
    "a/b/y": "refused",
    "b/y/x": "refused",
    "a/x@1": "refused",
    "b/y@1": "refused",
}


def test_name_fuzz_never_crosses_a_tenant(engine, tmp_path):  # noqa: F811
    registry = tmp_path / "reg"
    app, server, _ = in_process_app(engine, registry=str(registry), admin_token="adm")
    keys = KeyStore(open_store(str(registry)))
    reader = {"Authorization": f"Bearer {keys.create('a', Role.reader).key}"}
    writer = {"Authorization": f"Bearer {keys.create('a', Role.writer).key}"}
    blob = save_bundle(random_bundle(engine.spec, ["encoder.layer.0.attention.self.query"], rank=2, seed=3),
                       tmp_path / "x.safetensors").read_bytes()
    store = open_store(str(registry))

    async def main():
        got = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://capaserve") as c:
            for name in ("a/x", "b/y"):
                assert (await c.put(f"/v1/adapters/{name}", content=blob, headers={"Authorization": "Bearer adm"})).status_code == 201
            for name, want in NAMES.items():
                for what, resp in (
                    ("get", await c.get(f"/v1/adapters/{name}", headers=reader)),
                    ("download", await c.get(f"/v1/adapters/{name}/download", headers=reader)),
                    ("delete", await c.delete(f"/v1/adapters/{name}", headers=writer)),
                    ("put", await c.put(f"/v1/adapters/{name}", content=blob, headers=writer)),
                    ("model", await c.post("/v1/embeddings", json={"model": name.replace("%2F", "/").replace("%2f", "/"), "input": "x"},
                                           headers=reader)),
                ):
                    got.append((name, want, what, resp))
        await server.scheduler.close()
        return got

    crossed, errors = [], []
    for name, want, what, resp in asyncio.run(main()):
        code = resp.status_code
        if code >= 500:
            errors.append((name, what, code, resp.text))
        if code < 300 and what != "download":
            body = resp.json() if resp.content else {}
            if body.get("object") == "list" and what != "model":  # `a/..` normalised by the client to the list route
                if any(str(d.get("name")).startswith("b/") for d in body["data"]):
                    crossed.append((name, what, code, resp.text[:200]))
                continue
            touched = body.get("name") or body.get("model")
            if want == "refused" or (touched not in (None, "a/x")):
                crossed.append((name, what, code, resp.text[:200]))
        if code >= 400:
            sent = name.replace("%2F", "/").replace("%2f", "/")
            assert "b/y" not in error_of(resp)["message"] or "b/y" in sent, (name, what)  # only what was sent
    assert errors == []
    assert crossed == []
    # b's adapter is untouched: the one version the admin uploaded
    assert [m.version for m in store.versions("b/y")] == [1]
