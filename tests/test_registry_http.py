"""The registry HTTP API on a real uvicorn server (127.0.0.1, real HTTP via httpx), against a
MiniLM BaseModelSpec, on both store backends: bad uploads as a table, the happy path, the
vLLM admin routes, and a server SIGKILLed mid-upload."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import torch

from adapters.bundle import AdapterBundle, Task, save_bundle
from adapters.synthetic import random_bundle
from adapters.validation import BaseModelSpec, load_bundle
from serving.api.errors import error_body
from serving.api.registry import PATH_NOT_ALLOWED
from tests.conftest import MINILM_ID
from tests.registry_support import (
    ADMIN_TOKEN,
    BUCKET,
    S3_ENV,
    MotoServer,
    build_app,
    check_consistent,
    free_port,
    kill,
    open_store_url,
    snapshot,
    wait_port,
)

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]
LIMIT = 256 * 1024
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def minilm_model(minilm_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_dir).eval()


@pytest.fixture(scope="module")
def spec(minilm_model) -> BaseModelSpec:
    return BaseModelSpec.from_model(MINILM_ID, Task.FEATURE_EXTRACTION, minilm_model, minilm_model.config.hidden_size)


def bundle_bytes(b: AdapterBundle, tmp: Path) -> bytes:
    return save_bundle(b, tmp / "b.safetensors").read_bytes()


def raw_safetensors(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=header)


class Server:
    """uvicorn serving `app` in a thread of this process."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module", params=["local", "s3"])
def registry(request, spec, tmp_path_factory):
    """(client, store, changes) for a server on a fresh store of each backend."""
    if request.param == "local":
        url = str(tmp_path_factory.mktemp("http-registry"))
        moto = None
    else:
        os.environ.update(S3_ENV)
        moto = MotoServer()
        import boto3

        boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        url = f"s3://{BUCKET}/http|{moto.url}"
    store = open_store_url(url)
    changes: list[str] = []

    async def on_change(name: str) -> None:
        changes.append(name)

    spool = tmp_path_factory.mktemp("spool")
    server = Server(build_app(store, spec, max_upload_bytes=LIMIT, tmp_dir=spool, on_change=on_change))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, store, changes, spool
    server.stop()
    if moto is not None:
        moto.stop()


# -- the table of bad uploads -----------------------------------------------------------


def _mutated(spec: BaseModelSpec, tmp: Path, change: Callable[[AdapterBundle], None]) -> bytes:
    b = random_bundle(spec, TARGETS, rank=4, seed=3)
    change(b)
    return bundle_bytes(b, tmp)


def _set(t: torch.Tensor, value: float) -> None:
    t[0, 0] = value


def _header_and_tensors(spec: BaseModelSpec) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    b = random_bundle(spec, TARGETS, rank=4, seed=4)
    return b.metadata.to_header(), b.tensors()


def _drop_tensor(spec: BaseModelSpec, tmp: Path) -> bytes:
    header, tensors = _header_and_tensors(spec)
    del tensors[f"{TARGETS[1]}.mask_B"]
    return raw_safetensors(tensors, header)


def _extra_tensor(spec: BaseModelSpec, tmp: Path) -> bytes:
    header, tensors = _header_and_tensors(spec)
    tensors["encoder.layer.0.output.dense.lora_A"] = torch.zeros(4, 1536)
    return raw_safetensors(tensors, header)


def _bad_metadata(spec: BaseModelSpec, tmp: Path) -> bytes:
    header, tensors = _header_and_tensors(spec)
    header["rank"] = "four"
    return raw_safetensors(tensors, header)


def _encoded(spec: BaseModelSpec, encoding: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    b = random_bundle(spec, TARGETS, rank=4, seed=6, mask_encoding="seed" if encoding == "seed" else None)
    b = b if encoding == "seed" else b.with_encoding(encoding)  # type: ignore[arg-type]
    return b.metadata.to_header(), b.tensors()


def _short_packed_mask(spec: BaseModelSpec, tmp: Path) -> bytes:
    header, tensors = _encoded(spec, "packed")
    tensors[f"{TARGETS[0]}.mask_A"] = tensors[f"{TARGETS[0]}.mask_A"][:-1]
    tensors[f"{TARGETS[1]}.mask_B"] = tensors[f"{TARGETS[1]}.mask_B"].to(torch.int16)
    return raw_safetensors(tensors, header)


def _seed_with_masks(spec: BaseModelSpec, tmp: Path) -> bytes:
    header, tensors = _encoded(spec, "packed")
    header.update(mask_encoding="seed", mask_seed="18446744073709551616")  # 2^64
    return raw_safetensors(tensors, header)


def _unknown_encoding(spec: BaseModelSpec, tmp: Path) -> bytes:
    header, tensors = _encoded(spec, "dense")
    header["mask_encoding"] = "bits"
    return raw_safetensors(tensors, header)


def _other_spec(spec: BaseModelSpec, **changes: Any) -> BaseModelSpec:
    return dataclasses.replace(spec, **changes)


def _good(spec: BaseModelSpec, tmp: Path) -> bytes:
    return bundle_bytes(random_bundle(spec, TARGETS, rank=4, seed=5), tmp)


# (id, path name, body builder, extra headers, status, error type, message part)
BAD_UPLOADS: list[tuple[str, str, Callable[[BaseModelSpec, Path], bytes], dict[str, str], int, str, str]] = [
    ("pickle", "bad", lambda s, t: pickle.dumps({"weights": [1.0, 2.0]}), {}, 400, "invalid_adapter",
     "not a valid safetensors file"),
    ("truncated", "bad", lambda s, t: _good(s, t)[:-500], {}, 400, "invalid_adapter", "not a valid safetensors file"),
    ("empty", "bad", lambda s, t: b"", {}, 400, "invalid_adapter", "too short"),
    ("garbage-header", "bad", lambda s, t: (40).to_bytes(8, "little") + b"{" * 40 + b"x" * 64, {}, 400,
     "invalid_adapter", "header is not JSON"),
    ("wrong-base-model", "bad",
     lambda s, t: bundle_bytes(random_bundle(_other_spec(s, model_id="bert-base-uncased"), TARGETS, rank=4), t),
     {}, 400, "invalid_adapter", "does not match the served base"),
    ("nan", "bad", lambda s, t: _mutated(s, t, lambda b: _set(b.targets[TARGETS[0]].lora_A, math.nan)), {}, 400,
     "invalid_adapter", "holds NaN or Inf"),
    ("inf", "bad", lambda s, t: _mutated(s, t, lambda b: _set(b.targets[TARGETS[1]].lora_B, math.inf)), {}, 400,
     "invalid_adapter", "holds NaN or Inf"),
    ("shape-mismatch", "bad",
     lambda s, t: bundle_bytes(random_bundle(
         _other_spec(s, linear_shapes={**s.linear_shapes, TARGETS[0]: (384, 100)}), TARGETS, rank=4), t),
     {}, 400, "invalid_adapter", "base layer is [out=384, in=384], adapter is [out=384, in=100]"),
    ("unknown-target", "bad",
     lambda s, t: bundle_bytes(random_bundle(
         _other_spec(s, linear_shapes={**s.linear_shapes, "encoder.nope": (384, 384)}), ["encoder.nope"], rank=4), t),
     {}, 400, "invalid_adapter", "'encoder.nope' is not a Linear module"),
    ("missing-tensor", "bad", _drop_tensor, {}, 400, "invalid_adapter", "missing tensor"),
    ("extra-tensor", "bad", _extra_tensor, {}, 400, "invalid_adapter", "unexpected tensor"),
    ("bad-metadata", "bad", _bad_metadata, {}, 400, "invalid_adapter", "must be an integer"),
    ("packed-mask-sizes", "bad", _short_packed_mask, {}, 400, "invalid_adapter",
     f"tensor '{TARGETS[0]}.mask_A': expected shape [384], got [383]; tensor '{TARGETS[1]}.mask_B': "
     "expected a packed mask (uint8, mask_encoding packed), got dtype I16"),
    ("seed-out-of-range", "bad", _seed_with_masks, {}, 400, "invalid_adapter", "'mask_seed' must be below 2^64"),
    ("unknown-mask-encoding", "bad", _unknown_encoding, {}, 400, "invalid_adapter", "mask_encoding"),
    ("name-traversal", "..%2F..%2Fetc", _good, {}, 400, "invalid_request_error", "invalid adapter name"),
    ("name-too-long", "a" * 129, _good, {}, 400, "invalid_request_error", "invalid adapter name"),
    ("name-non-ascii", "n%C3%A4me", _good, {}, 400, "invalid_request_error", "invalid adapter name"),
    ("name-leading-dot", ".hidden", _good, {}, 400, "invalid_request_error", "invalid adapter name"),
    ("name-space", "a%20b", _good, {}, 400, "invalid_request_error", "invalid adapter name"),
    ("oversize", "bad", lambda s, t: b"\0" * (LIMIT + 1), {}, 413, "payload_too_large", "exceeds the limit"),
    ("sha-mismatch", "bad", _good, {"X-Content-SHA256": "0" * 64}, 400, "invalid_request_error", "sha256 mismatch"),
    ("no-token", "bad", _good, {"Authorization": ""}, 401, "authentication_error", "needs an admin token"),
    ("wrong-token", "bad", _good, {"Authorization": "Bearer nope"}, 403, "permission_error", "not valid"),
]


def _assert_error(r: httpx.Response, status: int, kind: str, part: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == status and body["error"]["type"] == kind, body
    assert part in body["error"]["message"], body


def test_bad_uploads_are_refused_and_change_nothing(registry, spec, tmp_path):
    client, store, changes, spool = registry
    assert client.put("/v1/adapters/existing", content=_good(spec, tmp_path), headers=AUTH).status_code == 201
    listing, files, n_changes = client.get("/v1/adapters").json(), snapshot(store), len(changes)
    failures = []
    for case, name, build, headers, status, kind, part in BAD_UPLOADS:
        body = build(spec, tmp_path)
        r = client.put(f"/v1/adapters/{name}", content=body, headers={**AUTH, **headers})
        try:
            _assert_error(r, status, kind, part)
        except AssertionError as exc:
            failures.append(f"{case}: {exc}")
        if client.get("/v1/adapters").json() != listing or snapshot(store) != files:
            failures.append(f"{case}: the registry changed")
    assert not failures, "\n".join(failures)
    assert len(changes) == n_changes and list(spool.iterdir()) == []  # spooled uploads cleaned up


def test_oversize_streamed_without_content_length_is_413(registry, spec):
    client, store, _, _ = registry
    files = snapshot(store)

    def body():
        for _ in range(LIMIT // 8192 + 2):
            yield b"\0" * 8192

    r = client.put("/v1/adapters/chunky", content=body(), headers=AUTH)
    _assert_error(r, 413, "payload_too_large", "exceeds the limit")
    assert snapshot(store) == files


@pytest.mark.parametrize(
    "files, data, headers, status, part",
    [
        ({"file": ("b.safetensors", b"")}, {}, {}, 400, "no 'name' field"),
        (None, {"name": "x"}, {}, 400, "multipart/form-data"),
        ({"file": ("b.safetensors", b"\0" * (LIMIT + 1))}, {"name": "x"}, {}, 413, "exceeds the limit"),
        ({"file": ("b.safetensors", b"x")}, {"name": "../x"}, {}, 400, "invalid adapter name"),
        ({"file": ("b.safetensors", b"x")}, {"name": "x"}, {"Authorization": "Bearer nope"}, 403, "not valid"),
    ],
    ids=["no-name", "not-multipart", "oversize", "bad-name", "wrong-token"],
)
def test_bad_multipart_uploads(registry, files, data, headers, status, part):
    client, store, _, _ = registry
    before = snapshot(store)
    r = client.post("/v1/adapters", files=files, data=data, headers={**AUTH, **headers})
    assert r.status_code == status and part in r.json()["error"]["message"], r.text
    assert snapshot(store) == before


def test_upload_versions_download_delete(registry, spec, tmp_path):
    client, store, changes, _ = registry
    v1 = _good(spec, tmp_path)
    v2 = bundle_bytes(random_bundle(spec, TARGETS, rank=2, seed=9), tmp_path)
    import hashlib

    r = client.put("/v1/adapters/happy", content=v1,
                   headers={**AUTH, "Content-Type": "application/octet-stream",
                            "X-Content-SHA256": hashlib.sha256(v1).hexdigest()})
    assert r.status_code == 201, r.text
    m1 = r.json()
    assert m1["name"] == "happy" and m1["version"] == 1 and m1["sha256"] == hashlib.sha256(v1).hexdigest()
    assert m1["size_bytes"] == len(v1) and m1["base_model"] == MINILM_ID and m1["task"] == "feature-extraction"
    assert (m1["rank"], m1["num_copies"], m1["alpha"], m1["targets"]) == (4, 2, 16.0, TARGETS) and m1["created_at"]
    r = client.post("/v1/adapters", files={"file": ("happy.safetensors", v2)},
                    data={"name": "happy", "sha256": hashlib.sha256(v2).hexdigest()}, headers=AUTH)
    assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["rank"] == 2, r.text
    assert changes[-2:] == ["happy", "happy"]

    detail = client.get("/v1/adapters/happy").json()
    assert detail["version"] == 2 and detail["versions"] == [1, 2]
    assert any(m["name"] == "happy" and m["version"] == 2 for m in client.get("/v1/adapters").json()["data"])
    r = client.get("/v1/adapters/happy/download", params={"version": 1})
    assert r.status_code == 200 and r.content == v1 and r.headers["x-content-sha256"] == m1["sha256"]
    assert client.get("/v1/adapters/happy/download").content == v2

    assert client.delete("/v1/adapters/happy", params={"version": 1}, headers=AUTH).status_code == 204
    assert client.get("/v1/adapters/happy").json()["versions"] == [2]
    _assert_error(client.get("/v1/adapters/happy/download", params={"version": 1}), 404, "not_found_error", "happy@1")
    _assert_error(client.get("/v1/adapters/happy/download", params={"version": "one"}), 400,
                  "invalid_request_error", "version")
    _assert_error(client.delete("/v1/adapters/happy"), 401, "authentication_error", "admin token")
    assert client.delete("/v1/adapters/happy", headers=AUTH).status_code == 204
    assert changes[-1] == "happy"
    _assert_error(client.get("/v1/adapters/happy"), 404, "not_found_error", "happy")
    _assert_error(client.get("/v1/adapters/happy/download"), 404, "not_found_error", "happy")
    _assert_error(client.delete("/v1/adapters/happy", headers=AUTH), 404, "not_found_error", "happy")
    assert all(m["name"] != "happy" for m in client.get("/v1/adapters").json()["data"])
    r = client.put("/v1/adapters/happy", content=v1, headers=AUTH)
    assert r.json()["version"] == 3  # numbers are never reused: replicas key caches by name@version
    check_consistent(store)


def test_vllm_load_and_unload_lora_adapter(registry, spec, minilm_model, minilm_dir, tmp_path):
    client, store, _, _ = registry
    path = save_bundle(random_bundle(spec, TARGETS, rank=4, seed=11), tmp_path / "bundle.safetensors")
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(path)}, headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    assert client.get("/v1/adapters/vl/download").content == path.read_bytes()

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(minilm_model), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    folder = tmp_path / "peft"
    peft_model.save_pretrained(folder)
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(folder)}, headers=AUTH)
    assert r.status_code == 200, r.text
    m = r.json()
    assert m["version"] == 2 and m["num_copies"] == 1 and m["base_model"] == MINILM_ID and len(m["targets"]) == 12
    stored = load_bundle(client.get("/v1/adapters/vl/download").content)  # as `capaserve pack` stores it
    assert stored.metadata.encoding == "seed" and all(bool(f.mask_A.all()) for f in stored.targets.values())

    bad = [
        ({"lora_name": "vl", "lora_path": str(tmp_path / "nowhere")}, AUTH, 400, "neither"),
        ({"lora_name": "v/l/x", "lora_path": str(path)}, AUTH, 400, "invalid adapter name"),
        ({"lora_name": "vl"}, AUTH, 400, "lora_path"),
        ({"lora_name": "vl", "lora_path": str(path)}, {}, 401, "admin token"),
    ]
    for body, headers, status, part in bad:
        r = client.post("/v1/load_lora_adapter", json=body, headers=headers)
        assert r.status_code == status and part in r.json()["error"]["message"], r.text
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "vl"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["deleted_versions"] == [1, 2]
    assert client.get("/v1/adapters/vl").status_code == 404
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "vl"}, headers=AUTH).status_code == 404
    check_consistent(store)


def test_reads_need_an_api_key_when_keys_are_configured(spec, tmp_path):
    from fastapi import FastAPI

    from adapters.registry.local import LocalStore
    from serving.api.auth import AuthSettings
    from serving.api.registry import RegistrySettings, build_registry_router

    async def base_spec() -> BaseModelSpec:
        return spec

    settings = RegistrySettings(auth=AuthSettings(admin_token=ADMIN_TOKEN, api_keys=["k1", "k2"]))
    app = FastAPI()
    app.include_router(build_registry_router(LocalStore(tmp_path / "reg"), settings, base_spec))
    server = Server(app)
    try:
        with httpx.Client(base_url=server.url) as c:
            assert c.get("/v1/adapters").status_code == 401
            assert c.get("/v1/adapters", headers={"Authorization": "Bearer k3"}).status_code == 401  # invalid key
            for token in ["k2", ADMIN_TOKEN]:
                assert c.get("/v1/adapters", headers={"Authorization": f"Bearer {token}"}).json()["data"] == []
            r = c.put("/v1/adapters/x", content=_good(spec, tmp_path), headers={"Authorization": "Bearer k1"})
            assert r.status_code == 403  # an API key is not the admin token
            assert "k1" not in repr(settings) and ADMIN_TOKEN not in repr(settings)
    finally:
        server.stop()


def test_server_killed_mid_upload_leaves_registry_consistent(spec, tmp_path):
    """SIGKILL a real uvicorn process while a slow upload streams in; restart; nothing changed."""
    root, spool = tmp_path / "registry", tmp_path / "spool"
    spool.mkdir()
    spec_json = tmp_path / "spec.json"
    spec_json.write_text(json.dumps(spec.to_dict()))

    def start() -> tuple[subprocess.Popen, str]:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.registry_support", "serve", str(root), str(spec_json), str(port),
             str(LIMIT), str(spool)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(port, proc, timeout_s=60)
        return proc, f"http://127.0.0.1:{port}"

    good = _good(spec, tmp_path)
    proc, url = start()
    try:
        assert httpx.put(f"{url}/v1/adapters/steady", content=good, headers=AUTH).status_code == 201
        store = open_store_url(str(root))
        files, listing = snapshot(store), httpx.get(f"{url}/v1/adapters").json()

        release = threading.Event()

        def slow_body():
            yield good[: len(good) // 2]
            release.wait(30)
            yield good[len(good) // 2 :]

        outcome: list[Any] = []

        def upload() -> None:
            try:
                outcome.append(httpx.put(f"{url}/v1/adapters/steady", content=slow_body(), headers=AUTH, timeout=30))
            except httpx.HTTPError as exc:
                outcome.append(exc)

        t = threading.Thread(target=upload)
        t.start()
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size for p in spool.iterdir()):  # the server is mid-upload
            assert time.monotonic() < deadline, "the upload never reached the server"
            time.sleep(0.02)
        kill(proc)
        release.set()
        t.join(30)
        assert outcome and isinstance(outcome[0], httpx.HTTPError)
    finally:
        kill(proc)

    left = [p.name for p in spool.iterdir()]
    assert len(left) == 1 and left[0].startswith("upload-")  # the killed upload's spool file
    proc, url = start()
    try:
        assert list(spool.iterdir()) == []  # removed at start: no live process held it
        assert httpx.get(f"{url}/v1/adapters").json() == listing
        assert snapshot(open_store_url(str(root))) == files  # the spool is not part of the registry
        r = httpx.put(f"{url}/v1/adapters/steady", content=good, headers=AUTH)
        assert r.status_code == 201 and r.json()["version"] == 2
        check_consistent(open_store_url(str(root)))
    finally:
        kill(proc)


def test_unreadable_lora_paths_and_non_utf8_bodies_are_400(spec, tmp_path):
    """Found by tests/test_api_fuzz.py: these were 500s (RuntimeError/OSError, HTTPException)."""
    from fastapi import FastAPI

    from adapters.registry.local import LocalStore
    from serving.api.auth import AuthSettings
    from serving.api.registry import RegistrySettings, build_registry_router

    async def base_spec() -> BaseModelSpec:
        return spec

    settings = RegistrySettings(auth=AuthSettings(admin_token=ADMIN_TOKEN))
    app = FastAPI()
    app.include_router(build_registry_router(LocalStore(tmp_path / "reg"), settings, base_spec))
    server = Server(app)
    paths = ["~no-such-user-capaserve/x.safetensors", "a" * 5000]
    if Path("/proc/self/mem").exists():
        paths.append("/proc/self/mem")  # a regular file whose read fails (EIO)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for lora_path in paths:
                r = c.post("/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": lora_path}, headers=AUTH)
                _assert_error(r, 400, "invalid_request_error", "lora_path")
            r = c.post("/v1/load_lora_adapter", content=b'{"lora_name": "\xff\xfe"}',
                       headers={**AUTH, "content-type": "application/json"})
            _assert_error(r, 400, "invalid_request_error", "pars")
            assert c.get("/v1/adapters").json()["data"] == []
    finally:
        server.stop()


def test_lora_path_outside_the_allowed_folders_is_one_fixed_400(registry, spec, tmp_path):
    """Whatever is there (a readable file, a secret, nothing, a folder, a link out of an allowed
    folder, a `..` escape), a path outside the allowed folders gets the same answer."""
    client, store, _, _ = registry
    allowed = Path(tempfile.gettempdir())
    outside = Path(tempfile.mkdtemp(dir=Path.home())) if not Path.home().is_relative_to(allowed) else None
    secret = (outside or Path("/etc")) / ("secret" if outside else "hostname")
    if outside:
        secret.write_bytes(b"x" * 631)
    link = tmp_path / "link.safetensors"
    link.symlink_to(secret)
    try:
        paths = [str(secret), "/etc/shadow", "/nonexistent/x", "/", str(link),
                 str(allowed / ".." / secret.relative_to("/")), "~root/.ssh/id_rsa"]
        bodies = set()
        before = snapshot(store)
        for p in paths:
            r = client.post("/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": p}, headers=AUTH)
            assert r.status_code == 400, (p, r.text)
            bodies.add(r.text)
        assert bodies == {json.dumps(error_body(PATH_NOT_ALLOWED, "invalid_request_error", 400), separators=(",", ":"))}
        assert snapshot(store) == before
    finally:
        if outside:
            shutil.rmtree(outside)


def test_download_streams_and_a_tampered_blob_never_completes(registry, spec, tmp_path):
    """Downloads stream in chunks (an 80 MB bundle as one message was a 500 through Serve's
    proxy); the digest is checked on the way, and a blob changed in storage ends the response
    short of its Content-Length instead of handing out other weights."""
    client, store, _, _ = registry
    bundle = random_bundle(spec, TARGETS, rank=256, seed=21)
    path = save_bundle(bundle, tmp_path / "streamed.safetensors")
    data = path.read_bytes()
    assert len(data) > 2 * 1024 * 1024  # several chunks (over this module's upload limit: committed directly)
    m = store.commit("streamed", path, bundle.metadata).model_dump()
    with client.stream("GET", "/v1/adapters/streamed/download") as r:
        assert r.status_code == 200 and int(r.headers["content-length"]) == len(data)
        parts = list(r.iter_raw())
    assert b"".join(parts) == data
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    if hasattr(store, "blobs"):
        (store.blobs / m["sha256"]).write_bytes(tampered)
    else:
        store.client.put_object(Bucket=store.bucket, Key=store._blob_key(m["sha256"]), Body=tampered)
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/v1/adapters/streamed/download")
    client.delete("/v1/adapters/streamed", headers=AUTH)
