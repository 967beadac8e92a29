"""Big requests through real Ray Serve, on both ports (Serve's proxy and the ingress replica's own).

Everything within the documented limits (docs/http-api.md#limits) succeeds at sizes over
gRPC's 4 MiB default message (2,048 inputs, a 9.7 MB response, an 11 MiB adapter
download), which was a bare 500; everything beyond them is the JSON error, at once, with
the ingress's and the proxy's memory back where it was.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time

import httpx
import numpy as np
import psutil
import pytest

from adapters.bundle import save_bundle
from adapters.synthetic import random_bundle
from serving.ray_local import direct_ingress_urls
from tests.conftest import MINILM_ID
from tests.engine_utils import embed
from tests.serve_helpers import APP_NAME, error_of, running_app

pytestmark = pytest.mark.ray

MiB = 1024 * 1024
UPLOAD_LIMIT = 12 * MiB
BODY_LIMIT = 32 * MiB  # the default


@pytest.fixture(scope="module")
def engine():
    from serving.config import EngineConfig
    from serving.engine.engine import Engine

    return Engine(EngineConfig(num_threads=1, dtype="float32"))


@pytest.fixture(scope="module")
def big_bundle(engine, tmp_path_factory):
    """A valid adapter of ~11 MiB, just under the upload limit of the app below."""
    targets = [n for n in engine.spec.linear_shapes if n.startswith("encoder.layer.")]
    path = save_bundle(random_bundle(engine.spec, targets, rank=48, seed=7), tmp_path_factory.mktemp("big") / "big.safetensors")
    assert 4 * MiB < path.stat().st_size <= UPLOAD_LIMIT, path.stat().st_size
    return path


@pytest.fixture(scope="module")
def ports(tmp_path_factory):
    """(proxy URL, direct ingress URL) of one app."""
    args = {"registry": str(tmp_path_factory.mktemp("registry")), "num_cpus": 1, "max_upload_bytes": UPLOAD_LIMIT}
    with running_app(args, num_cpus=2) as proxy:
        (direct,) = direct_ingress_urls(APP_NAME, "127.0.0.1")
        yield proxy, direct


def test_2048_inputs_and_long_texts_on_both_ports(ports, engine):
    texts = [f"input {i}: " + " ".join(["word"] * (i % 40)) for i in range(2048)]
    sample = list(range(0, 2048, 97))
    expected = embed(engine, [texts[i] for i in sample])
    for base in ports:
        r = httpx.post(f"{base}/v1/embeddings", json={"model": MINILM_ID, "input": texts}, timeout=300)
        assert r.status_code == 200, (base, r.status_code, r.text[:300])
        assert len(r.content) > 4 * MiB  # over gRPC's default message size, proxy to client
        data = r.json()["data"]
        assert [d["index"] for d in data] == list(range(2048))
        got = np.array([data[i]["embedding"] for i in sample], dtype=np.float32)
        np.testing.assert_allclose(got, expected.embeddings.numpy(), atol=1e-5)

    # long inputs within the limits: 510 tokens, and 32,768 characters (one word: one unknown token)
    long_texts = [" ".join(["word"] * 510), "a" * 32768]
    for base in ports:
        r = httpx.post(f"{base}/v1/embeddings", json={"model": MINILM_ID, "input": long_texts}, timeout=120)
        assert r.status_code == 200, r.text[:300]
        np.testing.assert_allclose(
            np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32),
            embed(engine, long_texts).embeddings.numpy(), atol=1e-5,
        )


def test_adapter_at_the_upload_limit_downloads_through_every_port(ports, big_bundle):
    proxy, direct = ports
    data = big_bundle.read_bytes()
    r = httpx.put(f"{proxy}/v1/adapters/big", content=data, timeout=120)
    assert r.status_code == 201, r.text
    for base in ports:
        r = httpx.get(f"{base}/v1/adapters/big/download", timeout=120)
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == hashlib.sha256(data).hexdigest()
    r = httpx.put(f"{direct}/v1/adapters/big", content=data + b"\0" * (UPLOAD_LIMIT - len(data) + 1), timeout=120)
    assert r.status_code == 413 and error_of(r)["type"] == "payload_too_large"


def _raw_post(url: str, path: str, headers: dict[str, str], body_bytes: int) -> tuple[int, dict, int]:
    """POST with a raw socket, sending up to `body_bytes` of body until the server answers or closes;
    (status, JSON body, body bytes sent before the answer came)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    chunk = b"x" * 65536
    unit = b"%x\r\n%s\r\n" % (len(chunk), chunk) if headers.get("Transfer-Encoding") == "chunked" else chunk
    t0 = time.perf_counter()
    s.sendall(head.encode())
    s.setblocking(False)
    sent, pending, answer = 0, memoryview(unit), b""
    while b"\r\n\r\n" not in answer:
        try:
            data = s.recv(65536)
            if not data:
                break
            answer += data
            continue
        except BlockingIOError:
            pass
        except OSError:
            break
        if sent < body_bytes:
            try:
                n = s.send(pending)
                sent += n
                pending = pending[n:] or memoryview(unit)
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                pass  # the server closed its side: read the answer
        else:
            time.sleep(0.001)
        if time.perf_counter() - t0 > 60:
            raise TimeoutError("no answer within 60 s")
    s.setblocking(True)
    head_bytes, _, rest = answer.partition(b"\r\n\r\n")
    lines = head_bytes.split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += s.recv(65536)
    s.close()
    assert rest[:length].startswith(b"{"), (head_bytes, rest[:200])
    return int(lines[0].split()[1]), json.loads(rest[:length]), sent


def _rss(port: int) -> int:
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid).memory_info().rss
    raise AssertionError(f"nothing listens on {port}")


def test_beyond_the_limits_json_error_at_once_and_memory_back(ports):
    """The ingress replica's own port (`capaserve serve --port` on a local cluster) reads no more
    than the limit: its memory grows by less than the limit plus 32 MiB after 300 MB attempts (a
    300 MB body read whole left 400-800 MB in the proxy and the ingress). Serve's proxy reads a
    body ahead of the app at socket speed, so a body sent without a length is buffered there
    until the 413 is back, however long that takes on a busy host (30-320 MB measured here):
    its answers are checked, its memory is Serve's (docs/http-api.md#limits)."""
    json_type = {"Content-Type": "application/json"}
    proxy, direct = ports
    for base in ports:
        port = int(base.rsplit(":", 1)[1])
        before = _rss(port)
        for _ in range(3):
            # a 300 MB body announced: refused from its Content-Length, the answer back before the body is sent
            status, body, sent = _raw_post(base, "/v1/embeddings", {**json_type, "Content-Length": str(300 * MiB)}, 300 * MiB)
            assert status == 413 and body["error"]["type"] == "payload_too_large" and body["error"]["code"] == 413
            assert sent < 300 * MiB, (base, sent)
            # 300 MB offered without a length (chunked): refused once BODY_LIMIT bytes have come in
            status, body, sent = _raw_post(base, "/v1/embeddings", {**json_type, "Transfer-Encoding": "chunked"}, 300 * MiB)
            assert status == 413 and body["error"]["type"] == "payload_too_large", body
            if base == direct:  # the proxy may take the whole body before the 413 is back (docstring)
                assert sent < 300 * MiB, (base, sent)
        if base == direct:
            grown = _rss(port) - before
            assert grown < BODY_LIMIT + 32 * MiB, grown / MiB  # what was read before the 413, and no more

        with httpx.Client(base_url=base, timeout=30) as c:
            # the ingress's bound on inputs, named in its answer (a replica would not know it)
            r = c.post("/v1/embeddings", json={"model": MINILM_ID, "input": ["x"] * 2049})
            assert r.status_code == 400 and "at most 2048" in error_of(r)["message"]
            # one text of 4.3 M characters inside the body limit: 400 from the ingress, not a replica's 500
            r = c.post("/v1/embeddings", json={"model": MINILM_ID, "input": "lorem ipsum " * 360_000})
            assert r.status_code == 400 and "characters" in error_of(r)["message"], r.text[:300]
