"""`capaserve serve` as a real subprocess: ready on /readyz, then SIGTERM leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.serve_helpers import free_port

pytestmark = pytest.mark.ray


def test_serve_subprocess_ready_then_sigterm_cleans_up(tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", CAPASERVE_PORT=str(port), XDG_CACHE_HOME=str(tmp_path / "cache"))
    exe = Path(sys.executable).with_name("capaserve")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "serving.cli"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [*cmd, "serve", "--host", "127.0.0.1", "--num-cpus", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.5)
        ready_line = "capaserve ready at http://127.0.0.1:%d" % port
        while ready_line not in (tmp_path / "serve.log").read_text():  # serve.run returns a bit after the proxy
            assert time.monotonic() < deadline, "no ready line logged"
            time.sleep(0.2)
        # one true story in the log: Ray's own ready line names the proxy, capaserve's names
        # --port and comes after every other "ready at" line
        lines = (tmp_path / "serve.log").read_text().splitlines()
        at = [i for i, line in enumerate(lines) if "ready at http" in line]
        ray_ready = [i for i in at if "Application 'capaserve' is ready at" in lines[i]]
        ours = [i for i in at if ready_line in lines[i]]
        assert ray_ready and ours and at[-1] == ours[0] and ray_ready[0] < ours[0], "\n".join(lines[-20:])
        ray_port = int(re.search(r"is ready at http://127\.0\.0\.1:(\d+)", lines[ray_ready[0]]).group(1))
        assert ray_port != port
        body = {"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "hi"}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json=body, timeout=30)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
        # --port is the ingress replica's own server; Serve's proxy, on the logged port, serves the same API
        direct = re.search(r"Serve's HTTP proxy .*: (http://127\.0\.0\.1:(\d+))", (tmp_path / "serve.log").read_text())
        assert direct and int(direct.group(2)) == ray_port, (tmp_path / "serve.log").read_text()[-3000:]
        d = httpx.post(f"{direct.group(1)}/v1/embeddings", json=body, timeout=30)
        assert d.status_code == 200 and d.json()["data"] == r.json()["data"]
        assert "Ingress" in _listener(port), "--port should be the ingress replica, not the proxy"
        assert "ProxyActor" in _listener(int(direct.group(2)))
        # --registry defaults to a folder under the user's cache dir
        assert (tmp_path / "cache" / "capaserve" / "registry").is_dir()
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "ray should have started processes"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.info if hasattr(p, "info") else p for p in alive]
        left = [p for p in psutil.process_iter(["pid"]) if _sid(p.pid) == proc.pid]
        assert not left, left
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _listener(port: int) -> str:
    """The command line of the process listening on 127.0.0.1:port."""
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return " ".join(psutil.Process(c.pid).cmdline())
    return ""


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None
