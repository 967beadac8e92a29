"""SIGTERM and SIGINT sent to the whole process group of `capaserve serve`, as systemd's default
`KillMode=control-group` and a terminal's Ctrl-C do: Ray's own processes (raylet, GCS, workers)
get the signal too. During and after a load (embeddings on MiniLM, generation on a tiny llama),
the command exits within its drain timeout + 5 s and leaves none of the processes it started
(recorded by pid, with their start times, while it served) behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from loadtest.run import free_port, wait_ready
from tests.conftest import MINILM_ID

pytestmark = pytest.mark.ray

DRAIN_S = 3.0


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _left(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def _load(url: str, body: dict, path: str, stop: threading.Event, codes: list[int]) -> None:
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            try:
                codes.append(c.post(f"{url}{path}", json=body).status_code)
            except httpx.HTTPError:
                codes.append(0)


def _stop_case(work: Path, model: list[str], path: str, body: dict, sig: int, during: bool) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--port", str(port), "--registry", str(work / "registry"),
           "--num-cpus", "1", "--drain-timeout-s", str(DRAIN_S), *model]
    log_path = work / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_ready(url, 240, proc)
        started = _tree(proc.pid)
        assert len(started) > 3, "the server's Ray processes are its descendants"
        stop, codes = threading.Event(), []
        users = [threading.Thread(target=_load, args=(url, body, path, stop, codes), daemon=True) for _ in range(3)]
        for u in users:
            u.start()
        while len(codes) < 6:  # a load that has run, by count
            assert proc.poll() is None
            time.sleep(0.1)
        if not during:
            stop.set()
            for u in users:
                u.join(timeout=60)
        start = time.monotonic()
        os.killpg(proc.pid, sig)  # the whole group: Ray's processes too
        try:
            proc.wait(timeout=DRAIN_S + 5.0 + 30)
        except subprocess.TimeoutExpired:
            pass
        exit_s = time.monotonic() - start
        stop.set()
        time.sleep(0.5)
        left = _left(started)
        assert proc.returncode is not None and exit_s <= DRAIN_S + 5.0, (exit_s, log_path.read_text()[-3000:])
        assert left == [], left
        assert 200 in codes
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("during", [False, True], ids=["after-load", "during-load"])
def test_group_signal_with_embeddings(tmp_path, sig, during):
    _stop_case(tmp_path, [], "/v1/embeddings", {"model": MINILM_ID, "input": ["a short text"] * 8}, sig, during)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("during", [False, True], ids=["after-load", "during-load"])
def test_group_signal_with_generation(tmp_path, tiny_llama_dir, sig, during):
    body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 32}
    _stop_case(tmp_path, ["--model", str(tiny_llama_dir), "--served-model-name", "tiny-llama"], "/v1/completions",
               body, sig, during)
