"""Test support for the registry: a moto S3 server in a subprocess, store factories, store
snapshots, and a `python -m tests.registry_support` entry for processes that tests kill.

Subcommands (run in a child process, so a test can SIGKILL them for real):

    commit STORE_URL NAME BUNDLE [SOURCE]    commit SOURCE (default BUNDLE; may be a FIFO)
    slow-s3-commit STORE_URL NAME BUNDLE     commit with the blob PUT body read slowly
    serve STORE_URL SPEC_JSON PORT [LIMIT]   uvicorn with the registry router on 127.0.0.1
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.run import free_port

BUCKET = "capaserve-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
ADMIN_TOKEN = "admin-secret"


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a process this test started (by its pid) and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


class MotoServer:
    """`python -m moto.server` on 127.0.0.1, as a subprocess ended by its pid."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **S3_ENV},
        )
        wait_port(self.port, self.proc)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill(self.proc)


def open_store_url(url: str, **kw: Any):
    """LocalStore for a path, S3Store (grace 0, so GC is observable) for `s3://...|endpoint`."""
    if url.startswith("s3://"):
        from adapters.registry.s3 import S3Store

        loc, _, endpoint = url.partition("|")
        return S3Store.from_url(loc, endpoint_url=endpoint, gc_grace_s=kw.get("gc_grace_s", 0.0))
    from adapters.registry.local import LocalStore

    return LocalStore(Path(url))


def snapshot(store) -> dict[str, str]:
    """Every stored object/file -> digest of its bytes; equal snapshots mean an untouched store."""
    from adapters.registry.local import LocalStore

    out: dict[str, str] = {}
    if isinstance(store, LocalStore):
        for p in sorted(store.root.rglob("*")):
            if p.is_file() and p.name != ".lock":
                out[str(p.relative_to(store.root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out
    for obj in store._list(store.prefix):
        body = store.client.get_object(Bucket=store.bucket, Key=obj["Key"])["Body"].read()
        out[obj["Key"]] = hashlib.sha256(body).hexdigest()
    return out


def check_consistent(store) -> None:
    """Every live manifest parses and its blob exists with the recorded digest and size."""
    for latest in store.list_latest():
        for m in store.versions(latest.name):
            data = store.read_blob(m.sha256)
            assert hashlib.sha256(data).hexdigest() == m.sha256 and len(data) == m.size_bytes, m


# -- child-process entry points ---------------------------------------------------------


def _metadata(bundle: str):
    from adapters.bundle import BundleMetadata
    from adapters.validation import parse_header

    header, _ = parse_header(Path(bundle).read_bytes())
    return BundleMetadata.from_header(header)


def _commit(url: str, name: str, bundle: str, source: str | None = None) -> None:
    store = open_store_url(url)
    m = store.commit(name, Path(source or bundle), _metadata(bundle))
    print(m.version, flush=True)


def _slow_s3_commit(url: str, name: str, bundle: str) -> None:
    """Commit with the request bodies trickling onto the wire; prints 'sending' once they start.

    The socket is slowed rather than the file, since botocore reads a body several times
    (checksum, signature) before it sends it: only this way the kill lands mid-transfer.
    """
    import socket as socket_mod

    real_sendall = socket_mod.socket.sendall
    told = False

    def sendall(self: Any, data: Any, *args: Any) -> None:
        nonlocal told
        view = memoryview(data)
        if len(view) < 16384:  # headers and small manifests go out at once
            return real_sendall(self, data, *args)
        if not told:
            print("sending", flush=True)
            told = True
        for i in range(0, len(view), 16384):
            real_sendall(self, view[i : i + 16384], *args)
            time.sleep(0.02)

    socket_mod.socket.sendall = sendall  # type: ignore[method-assign]
    store = open_store_url(url)
    m = store.commit(name, Path(bundle), _metadata(bundle))
    print(m.version, flush=True)


def build_app(store, spec, *, max_upload_bytes: int, admin_token: str | None = ADMIN_TOKEN, tmp_dir=None,
              on_change=None):
    from fastapi import FastAPI

    from serving.api.auth import AuthSettings
    from serving.api.registry import RegistrySettings, build_registry_router

    async def base_spec():
        return spec

    import tempfile

    settings = RegistrySettings(
        max_upload_bytes=max_upload_bytes, tmp_dir=tmp_dir, auth=AuthSettings(admin_token=admin_token),
        allowed_paths=[tempfile.gettempdir()],  # where the tests' bundles and PEFT folders are written
    )
    app = FastAPI()
    app.include_router(build_registry_router(store, settings, base_spec, on_change))
    return app


def _serve(url: str, spec_json: str, port: str, limit: str = str(1 << 20), tmp_dir: str | None = None) -> None:
    import uvicorn

    from adapters.validation import BaseModelSpec

    spec = BaseModelSpec.from_dict(json.loads(Path(spec_json).read_text()))
    app = build_app(open_store_url(url), spec, max_upload_bytes=int(limit), tmp_dir=tmp_dir)
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"commit": _commit, "slow-s3-commit": _slow_s3_commit, "serve": _serve}[cmd](*args)
