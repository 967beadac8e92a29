"""Start one real Ray Serve application on 127.0.0.1 for a test module, and stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from loadtest.run import free_port
from loadtest.run import wait_ready as server_ready

APP_NAME = "capaserve"
#: The console script of the environment running the tests (found without PATH: a venv need not be activated).
CAPASERVE = str(Path(sys.executable).with_name("capaserve"))


class DirectClient:
    """A ModelClient calling a ModelServer (the real deployment class) in this process, as the
    Ray handle would: tests of the ingress logic run in seconds without a cluster."""

    def __init__(self, server) -> None:
        self.server = server

    async def call(self, method, call):
        return await getattr(self.server, method)(call)

    async def call_many(self, method, calls):
        return await self.server.call_many(method, calls)

    async def stream(self, call):
        async for item in self.server.generate_stream(call):
            yield item

    async def info(self):
        return await self.server.info()


def in_process_app(engine, **settings):
    """(FastAPI app, ModelServer, CoalescingClient): the real app over the real deployment class
    in this process (no Ray), its replica calls joined as a one-replica deployment's ingress
    joins them (across adapters), with at most one in flight so that concurrent requests do
    get joined. `settings` are named as flags."""
    from serving.coalesce import CoalescingClient
    from serving.config_sources import config_of
    from serving.deployments import ModelServer
    from serving.ingress import _build_context, create_api

    args = config_of(**settings)
    server = ModelServer(args, engine=engine)
    ctx, store, registry_settings = _build_context(None, args)
    client = ctx.client = CoalescingClient(DirectClient(server), max_inflight=1, join_adapters=True)
    return create_api(ctx, store, registry_settings), server, client


@contextmanager
def running_app(args_dict: dict, num_cpus: int = 4) -> Iterator[str]:
    """A local Ray cluster serving the app of `args_dict` (settings named as flags) at the yielded base URL.

    float32 unless `args_dict` names a dtype: these tests compare answers with float32 engines
    at float32 tolerances; tests/test_precision.py serves the default dtype."""
    args_dict = {"dtype": "float32", **args_dict}
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.config_sources import config_of
    from serving.ray_local import init_local_ray

    port = free_port()
    config = config_of(host="127.0.0.1", port=port, **args_dict)
    init_local_ray(num_cpus, log_to_driver=True, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "app never became ready"
            time.sleep(0.2)
        yield base
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def error_of(resp: httpx.Response) -> dict:
    """The inner object of the error body (docs/http-api.md#errors), checked for shape and code."""
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "code"} and err["code"] == resp.status_code, body
    assert isinstance(err["message"], str) and err["message"]
    return err


@contextmanager
def serve_process(log_path, *args: str, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """`capaserve serve ARGS` as a subprocess in its own session, output to `log_path`; its
    whole process group is SIGKILLed on exit if it is still running."""
    cmd = [CAPASERVE] if Path(CAPASERVE).exists() else [sys.executable, "-m", "serving.cli"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*cmd, "serve", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_ready(base: str, proc: subprocess.Popen, log_path, timeout_s: float = 180) -> None:
    """Until `base`/readyz answers 200 (loadtest.run.wait_ready); fails early, with the log's
    tail, if `proc` exits."""
    try:
        server_ready(base, timeout_s, proc)
    except (RuntimeError, TimeoutError) as exc:
        raise AssertionError(f"{exc}: {Path(log_path).read_text()[-3000:]}") from None
