"""The environment `capaserve serve` runs in: a stray cluster on the host, an unreachable registry.

* A cluster `ray start` left on the host (its address in Ray's address file) must not be
  joined: `capaserve serve` without RAY_ADDRESS starts a cluster of its own. Joining it
  crashed on `num_cpus`, or would have put our replicas on a cluster nobody asked for.
* A registry the replicas cannot reach makes `/readyz` 503, with the reason in the log, and
  200 again once it answers (it was 200 throughout while every adapter call was a 500).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import httpx
import psutil
import pytest

from tests.conftest import MINILM_ID
from tests.registry_support import BUCKET, S3_ENV, MotoServer
from tests.serve_helpers import error_of, free_port, serve_process, wait_ready

pytestmark = pytest.mark.ray


@pytest.fixture
def own_tmp():
    """A short temp folder of this test's own (Ray's socket paths must stay under 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="capaserve-15a-", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_serve_starts_its_own_cluster_beside_a_stray_one(own_tmp, monkeypatch, tmp_path):
    from ray.cluster_utils import Cluster

    # The stray cluster writes its address where a plain ray.init() looks: $RAY_TMPDIR/ray/ray_current_cluster
    # (this test's folder, so no other process on the host sees it).
    monkeypatch.setenv("RAY_TMPDIR", str(own_tmp))
    stray = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "temp_dir": str(own_tmp / "ray"), "include_dashboard": False,
    })
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # what `capaserve serve` did before: ray.init without an address finds the stray cluster and
        # fails on num_cpus ("When connecting to an existing cluster, num_cpus ... must not be provided")
        probe = subprocess.run(
            [sys.executable, "-c", "import ray; ray.init(num_cpus=1, _node_ip_address='127.0.0.1')"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert "connecting to an existing cluster" in probe.stderr, probe.stderr[-2000:]

        port = free_port()
        env.update(HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(tmp_path / "cache"))
        log = tmp_path / "serve.log"
        with serve_process(log, "--host", "127.0.0.1", "--port", str(port), "--num-cpus", "1", env=env) as proc:
            wait_ready(f"http://127.0.0.1:{port}", proc, log)
            r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": MINILM_ID, "input": "hi"}, timeout=30)
            assert r.status_code == 200
            # its own GCS and raylet, bound to loopback ...
            own = [" ".join(p.cmdline()) for p in psutil.Process(proc.pid).children(recursive=True)]
            assert any("gcs_server" in c for c in own) and any("raylet" in c for c in own), own
            raylets = [c for c in own if c.split()[0].endswith("raylet")]
            assert raylets and all("--node_ip_address=127.0.0.1" in c for c in raylets), [c[c.find("node_ip"):][:60] for c in raylets]
            # ... and nothing of ours on the stray cluster
            stray_workers = [
                " ".join(p.cmdline()) for p in psutil.Process(stray.head_node.all_processes["raylet"][0].process.pid)
                .children(recursive=True)
            ]
            assert not any("Serve" in c for c in stray_workers), stray_workers
    finally:
        stray.shutdown()  # the processes this test started, by their pids


def test_readyz_fails_while_the_registry_is_unreachable(tmp_path, monkeypatch, capfd):
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.config_sources import config_of
    from serving.ray_local import init_local_ray

    s3_port = free_port()  # nothing listens here yet
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    port = free_port()
    config = config_of(host="127.0.0.1", port=port, num_cpus=1, registry=f"s3://{BUCKET}/reg",
                       registry_endpoint_url=f"http://127.0.0.1:{s3_port}")
    init_local_ray(2, log_to_driver=True, configure_logging=False)
    moto = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="capaserve", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        r = httpx.get(f"{base}/readyz", timeout=30)
        assert r.status_code == 503 and error_of(r)["type"] == "unavailable"
        assert "adapter registry unreachable" in error_of(r)["message"]
        assert str(s3_port) not in r.text  # the reason names internal hosts: the log gets it, not the client
        deadline = time.monotonic() + 30
        seen = ""
        while "EndpointConnectionError" not in seen:
            seen += "".join(capfd.readouterr())
            assert time.monotonic() < deadline, "no reason in the log: " + seen[-3000:]
            time.sleep(0.5)
        assert f"127.0.0.1:{s3_port}" in seen

        moto = MotoServer(port=s3_port)
        boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/readyz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "never ready once the registry answered"
            time.sleep(0.5)
        r = httpx.get(f"{base}/v1/adapters", timeout=30)
        assert r.status_code == 200 and r.json()["data"] == []
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if moto is not None:
                moto.stop()


def test_readyz_503_while_no_model_replica_can_serve(tmp_path):
    """The one model replica dies: /readyz is 503 until Serve's replacement has loaded the model."""
    from tests.serve_helpers import running_app

    with running_app({"registry": str(tmp_path / "registry"), "num_cpus": 1}, num_cpus=2) as base:
        (replica,) = [p for p in psutil.Process().children(recursive=True)
                      if "ServeReplica:capaserve:CapaserveModel" in " ".join(p.cmdline())]
        replica.kill()  # by its pid
        seen: list[int] = []
        deadline = time.monotonic() + 90
        while not (503 in seen and seen[-1] == 200):
            assert time.monotonic() < deadline, seen
            r = httpx.get(f"{base}/readyz", timeout=30)
            if r.status_code == 503:
                assert "no replica answered" in error_of(r)["message"]
            seen.append(r.status_code)
            time.sleep(0.3)
        r = httpx.post(f"{base}/v1/embeddings", json={"model": MINILM_ID, "input": "back"}, timeout=30)
        assert r.status_code == 200
