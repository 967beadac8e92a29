"""serving/floor.py answers /v1/embeddings as capaserve does with the model taken out (so what
loadtest/bench_floor.py measures is capaserve's request and response work), over real HTTP
from its own process; and the bound bench_floor prints is the arithmetic its docstring states."""

from __future__ import annotations

import base64
import math
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from loadtest.bench_floor import bound, client_cpu_ms_per_request
from loadtest.run import free_port
from serving.floor import DIMENSIONS, unit_vectors


@pytest.fixture(scope="module")
def floor_url() -> str:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.floor", "--mode", "fastapi", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/docs", timeout=2)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the floor server did not come up") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_unit_vectors_are_one_fixed_unit_vector() -> None:
    v = unit_vectors(3)
    assert v.shape == (3, DIMENSIONS) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    assert (v == v[0]).all() and np.argmax(v[0]) == DIMENSIONS - 1  # increasing components


def test_floor_answers_like_capaserve(floor_url: str) -> None:
    expected = unit_vectors(1)[0]
    r = httpx.post(f"{floor_url}/v1/embeddings", json={"model": "m", "input": ["a b c", "d"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "m" and body["usage"]["prompt_tokens"] == 4
    assert [d["index"] for d in body["data"]] == [0, 1]
    for d in body["data"]:
        assert np.array_equal(np.asarray(d["embedding"], dtype=np.float32), expected)  # shortest float32 form reads back

    r = httpx.post(f"{floor_url}/v1/embeddings", json={"model": "m", "input": "x", "encoding_format": "base64"})
    raw = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(raw, expected)

    r = httpx.post(f"{floor_url}/v1/embeddings", json={"model": "m", "input": "x", "dimensions": 8})
    short = np.asarray(r.json()["data"][0]["embedding"])
    assert short.shape == (8,) and np.allclose(short, expected[:8] / np.linalg.norm(expected[:8]), atol=1e-6)


BAD = [{"model": "m", "input": []}, {"model": "m"}, {"model": "m", "input": "x", "encoding_format": "hex"}]


@pytest.mark.parametrize("body", BAD)
def test_floor_refuses_what_capaserve_refuses(floor_url: str, body: dict) -> None:
    r = httpx.post(f"{floor_url}/v1/embeddings", json=body)
    assert r.status_code == 422, r.text


def test_bound_is_the_cores_left_to_the_forward() -> None:
    ceiling = {"texts_per_s": 1000.0, "cpu_s_per_1000_texts": 2.0}  # 2 ms of CPU a text: the 2 cores busy
    free = {"server_cpu_ms_per_request": 0.0, "client_cpu_ms_per_request": 0.0}
    assert bound(2, ceiling, free, 1) == pytest.approx(1.0)  # nothing but the forward: the ceiling itself
    run = {"server_cpu_ms_per_request": 1.5, "client_cpu_ms_per_request": 0.5}
    # 2 ms a request on top of 2 ms a text: one text a request leaves half; 8 texts, 2 / 2.25
    assert bound(2, ceiling, run, 1) == pytest.approx(0.5)
    assert bound(2, ceiling, run, 8) == pytest.approx(2 / 2.25)


def test_locust_cpu_per_request_leaves_its_start_out() -> None:
    start, per_request = 1.5, 0.0004  # seconds: Locust's imports, then 0.4 ms a request
    short = {"requests": 1000, "client_cpu_s": start + 1000 * per_request}
    long = {"requests": 5000, "client_cpu_s": start + 5000 * per_request}
    assert client_cpu_ms_per_request(short, long) == pytest.approx(0.4)
    assert math.isnan(client_cpu_ms_per_request(long, long))
