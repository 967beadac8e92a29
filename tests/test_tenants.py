"""Tenants, roles and keys through real Ray Serve on 127.0.0.1, with a local and an S3 (moto) registry.

The access matrix is generated from one table (`EXPECTED`): for every route, every caller
(the admin token, an `--api-keys` key, and stored reader/writer/admin keys of tenant `a`,
each valid, revoked or unknown) and every target (tenant `a`'s own name, tenant `b`'s name,
a shared name), the status the contract gives. On top of the statuses:

* a 404 for another tenant's name has exactly the body of a name that does not exist;
* `GET /v1/adapters` and `/v1/models` list exactly the names the caller may see;
* no upload or delete by a caller of tenant `a` ever lands on a name of `b` (the registry is
  read afterwards, and the audit trail names who wrote what);
* a key revoked over HTTP is refused within a second.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import boto3
import httpx
import pytest

from adapters.bundle import Task, save_bundle
from adapters.registry import audit
from adapters.registry.backends import open_store
from adapters.synthetic import random_bundle
from adapters.validation import BaseModelSpec
from tests.conftest import MINILM_ID
from tests.registry_support import BUCKET, S3_ENV, MotoServer
from tests.serve_helpers import APP_NAME, error_of, running_app

pytestmark = pytest.mark.ray

ADMIN = "tenants-admin-token"
API_KEY = "tenants-api-key"
OWN, OTHER, SHARED = "a/x", "b/y", "s"
TARGETS = {"own": OWN, "other": OTHER, "shared": SHARED}
#: Names the write routes use, so reads always find the fixtures above.
WRITE_TARGETS = {"own": "a/w", "other": "b/w", "shared": "w"}

# -- the one table ------------------------------------------------------------------------
#: caller -> route kind -> status per target (own, other, shared); callers of the "key state"
#: revoked/unknown are derived below (401 on reads, 403 on writes and admin routes).
EXPECTED: dict[str, dict[str, tuple[int, int, int] | int]] = {
    #              reads: own other shared      upload           delete            keys   metrics
    "admin-token": {"read": (200, 200, 200), "put": (201, 201, 201), "delete": (204, 204, 204), "keys": 200, "metrics": 200},
    "api-key":     {"read": (404, 404, 200), "put": (403, 403, 403), "delete": (403, 403, 403), "keys": 403, "metrics": 403},
    "reader":      {"read": (200, 404, 200), "put": (403, 403, 403), "delete": (403, 403, 403), "keys": 403, "metrics": 403},
    "writer":      {"read": (200, 404, 200), "put": (201, 403, 403), "delete": (204, 403, 403), "keys": 403, "metrics": 403},
    "admin":       {"read": (200, 200, 200), "put": (201, 201, 201), "delete": (204, 204, 204), "keys": 200, "metrics": 200},
}
REFUSED = {"read": (401, 401, 401), "put": (403, 403, 403), "delete": (403, 403, 403), "keys": 403, "metrics": 403}
READ_ROUTES = ("get", "download", "embeddings")


def expected(caller: str, state: str, kind: str, target: str | None = None) -> int:
    row = EXPECTED[caller] if state == "valid" else REFUSED
    value = row[kind]
    if isinstance(value, tuple):
        return value[list(TARGETS).index(target)]
    return value


def callers() -> list[tuple[str, str]]:
    out = [("admin-token", "valid"), ("api-key", "valid")]
    out += [(role, state) for role in ("reader", "writer", "admin") for state in ("valid", "revoked", "unknown")]
    return out


# -- the server ---------------------------------------------------------------------------


@contextmanager
def _registry(kind: str, tmp_path_factory):
    if kind == "local":
        yield {"registry": str(tmp_path_factory.mktemp("tenants-registry"))}
        return
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    moto = MotoServer()
    try:
        boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield {"registry": f"s3://{BUCKET}/tenants", "registry_endpoint_url": moto.url}
    finally:
        moto.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module", params=["local", "s3"])
def server(request, tmp_path_factory):
    """(base URL, registry store, bundle bytes, keys by caller and state)."""
    from ray import serve

    with _registry(request.param, tmp_path_factory) as reg:
        args = {**reg, "admin_token": ADMIN, "api_keys": API_KEY, "replicas": 1, "num_cpus": 1,
                "max_seq_len": 64, "registry_poll_s": 0.5, "max_upload_bytes": 4 * 1024 * 1024}
        with running_app(args, num_cpus=2) as base:
            handle = serve.get_deployment_handle("CapaserveModel", app_name=APP_NAME)
            spec = BaseModelSpec.from_dict(handle.info.remote().result(timeout_s=60).spec)
            targets = [n for n in spec.linear_shapes if n.endswith("attention.self.query")][:1]
            path = tmp_path_factory.mktemp("tenants-bundles") / "b.safetensors"
            blob = save_bundle(random_bundle(spec, targets, rank=2, seed=1, task=Task.FEATURE_EXTRACTION), path).read_bytes()
            admin = {"Authorization": f"Bearer {ADMIN}"}
            for name in TARGETS.values():
                assert httpx.put(f"{base}/v1/adapters/{name}", content=blob, headers=admin, timeout=60).status_code == 201
            keys: dict[tuple[str, str], str] = {("admin-token", "valid"): ADMIN, ("api-key", "valid"): API_KEY}
            for role in ("reader", "writer", "admin"):
                for state in ("valid", "revoked"):
                    r = httpx.post(f"{base}/v1/keys", json={"tenant": "a", "role": role, "name": f"{role}-{state}"},
                                   headers=admin, timeout=30)
                    assert r.status_code == 201, r.text
                    keys[(role, state)] = r.json()["key"]
                    if state == "revoked":
                        assert httpx.delete(f"{base}/v1/keys/{r.json()['id']}", headers=admin, timeout=30).status_code == 204
                keys[(role, "unknown")] = "csk_000000000000_" + "x" * 43
            time.sleep(1.0)  # the revocations reach the ingress's key cache (the contract: within a second)
            store = open_store(reg["registry"], endpoint_url=reg.get("registry_endpoint_url"))
            yield base, store, blob, keys


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _read(base: str, route: str, name: str, token: str) -> httpx.Response:
    if route == "get":
        return httpx.get(f"{base}/v1/adapters/{name}", headers=_auth(token), timeout=30)
    if route == "download":
        return httpx.get(f"{base}/v1/adapters/{name}/download", headers=_auth(token), timeout=30)
    return httpx.post(f"{base}/v1/embeddings", json={"model": name, "input": "hello"}, headers=_auth(token), timeout=60)


# -- the matrix ---------------------------------------------------------------------------


def test_access_matrix(server):
    base, store, blob, keys = server
    admin = _auth(ADMIN)
    wrong: list[str] = []

    def check(case: str, resp: httpx.Response, want: int) -> None:
        if resp.status_code != want:
            wrong.append(f"{case}: {resp.status_code} (expected {want}) {resp.text[:200]}")

    for caller, state in callers():
        token = keys[(caller, state)]
        for target, name in TARGETS.items():
            for route in READ_ROUTES:
                want = expected(caller, state, "read", target)
                resp = _read(base, route, name, token)
                check(f"{caller}/{state} {route} {target}", resp, want)
                if resp.status_code == 404:  # exactly what a name that does not exist answers
                    ghost = name + "-ghost"
                    unknown = _read(base, route, ghost, token)
                    assert unknown.status_code == 404
                    assert resp.json() == {"error": {**error_of(unknown),
                                                     "message": error_of(unknown)["message"].replace(ghost, name)}}
            wname = WRITE_TARGETS[target]
            before = [m.version for m in store.versions(wname)]
            resp = httpx.put(f"{base}/v1/adapters/{wname}", content=blob, headers=_auth(token), timeout=60)
            check(f"{caller}/{state} put {target}", resp, expected(caller, state, "put", target))
            after = [m.version for m in store.versions(wname)]
            assert len(after) == len(before) + (resp.status_code == 201), (caller, state, wname)
            version = httpx.put(f"{base}/v1/adapters/{wname}", content=blob, headers=admin, timeout=60).json()["version"]
            resp = httpx.delete(f"{base}/v1/adapters/{wname}", params={"version": version}, headers=_auth(token), timeout=30)
            check(f"{caller}/{state} delete {target}", resp, expected(caller, state, "delete", target))
            still = version in [m.version for m in store.versions(wname)]
            assert still == (resp.status_code != 204), (caller, state, wname)
        check(f"{caller}/{state} keys", httpx.get(f"{base}/v1/keys", headers=_auth(token), timeout=30),
              expected(caller, state, "keys"))
        check(f"{caller}/{state} metrics", httpx.get(f"{base}/metrics", headers=_auth(token), timeout=30),
              expected(caller, state, "metrics"))
    assert not wrong, "\n".join(wrong)

    # 0 cross-tenant writes: every change to b's names was made by a key that may write them
    allowed = {"admin-token", *(r["id"] for r in httpx.get(f"{base}/v1/keys", headers=admin, timeout=30).json()["data"]
                                  if r["role"] == "admin")}
    writes = [e for e in audit.read(store) if e.action.startswith("adapter.")]
    assert writes, "the audit trail records the uploads"
    crossing = [e for e in writes if e.name.startswith("b/") and e.key_id not in allowed]
    assert crossing == []


@pytest.mark.parametrize("caller", ["api-key", "reader", "writer", "admin", "admin-token"])
def test_lists_show_only_what_the_caller_may_see(server, caller):
    base, _, _, keys = server
    token = keys[(caller, "valid")]
    visible = {n for t, n in TARGETS.items() if expected(caller, "valid", "read", t) == 200}
    fixtures = set(TARGETS.values())
    listed = {m["name"] for m in httpx.get(f"{base}/v1/adapters", headers=_auth(token), timeout=30).json()["data"]}
    assert listed & fixtures == visible
    assert all(not n.startswith("b/") for n in listed) or EXPECTED[caller]["read"][1] == 200
    models = httpx.get(f"{base}/v1/models", headers=_auth(token), timeout=30).json()["data"]
    ids = {m["id"] for m in models}
    assert MINILM_ID in ids and ids & fixtures == visible


def test_revoked_key_is_refused_within_a_second(server):
    base, _, _, _ = server
    admin = _auth(ADMIN)
    created = httpx.post(f"{base}/v1/keys", json={"tenant": "a", "role": "reader"}, headers=admin, timeout=30).json()
    listed = httpx.get(f"{base}/v1/keys", headers=admin, timeout=30).json()["data"]
    assert created["id"] in {k["id"] for k in listed} and all("key" not in k for k in listed)
    assert httpx.get(f"{base}/v1/adapters/{OWN}", headers=_auth(created["key"]), timeout=30).status_code == 200
    assert httpx.delete(f"{base}/v1/keys/{created['id']}", headers=admin, timeout=30).status_code == 204
    time.sleep(1.0)
    assert httpx.get(f"{base}/v1/adapters/{OWN}", headers=_auth(created["key"]), timeout=30).status_code == 401
    assert httpx.delete(f"{base}/v1/keys/{created['id']}", headers=admin, timeout=30).status_code == 404


def test_audit_records_writes_and_key_changes(server):
    base, store, blob, keys = server
    r = httpx.put(f"{base}/v1/adapters/a/audited", content=blob, headers=_auth(keys[("writer", "valid")]), timeout=60)
    assert r.status_code == 201
    manifest = r.json()
    assert httpx.delete(f"{base}/v1/adapters/a/audited", headers=_auth(ADMIN), timeout=30).status_code == 204
    entries = audit.read(store)
    writer_id = next(k["id"] for k in httpx.get(f"{base}/v1/keys", headers=_auth(ADMIN), timeout=30).json()["data"]
                     if k["name"] == "writer-valid")
    upload = [e for e in entries if e.action == "adapter.upload" and e.name == "a/audited"]
    assert [(e.key_id, e.tenant, e.version, e.sha256) for e in upload] == [
        (writer_id, "a", manifest["version"], manifest["sha256"])]
    delete = [e for e in entries if e.action == "adapter.delete" and e.name == "a/audited"]
    assert [(e.key_id, e.version, e.sha256) for e in delete] == [("admin-token", manifest["version"], manifest["sha256"])]
    assert {e.action for e in entries} >= {"key.create", "key.revoke"}
    assert [e.time for e in entries] == sorted(e.time for e in entries)
