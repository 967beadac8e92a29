"""Steady load and the faults it is measured through: shared by the fault scripts and tests.

- `SteadyLoad`: a closed loop of client threads on 127.0.0.1 that records every request
  (when it was sent, when it ended, its status or the client error), for as long as it
  runs (bounded by the caller).
- `model_replica_pids(root)`: the model replicas (Ray Serve replica processes) started
  under process `root` (the `capaserve serve` the script started, or the test process
  that started Ray): killing by pid touches nothing another Ray on the host runs.
- `wait_until_busy(pid)`: until that process computes, so a kill lands on work in progress.
- `replica_counts(url)`: requests answered per model replica, from /metrics.
- `capaserve_serve(work, *flags)`: `capaserve serve` as a subprocess on a free loopback port,
  its log in `work/serve.log`, stopped with SIGTERM on exit if it still runs.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from loadtest.run import free_port, wait_ready

MODEL_REPLICA_TITLE = "ServeReplica:capaserve:CapaserveModel"


@dataclass(frozen=True)
class Sent:
    """One request of the load: its route, when it was sent and ended (monotonic seconds), and how."""

    path: str
    start: float
    end: float
    status: int | None  # None: no HTTP answer (connection refused, reset or cut)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class SteadyLoad:
    """`users` threads, each sending `next(requests)` (path, JSON body) back to back until stopped."""

    url: str
    requests: Callable[[], Iterator[tuple[str, dict]]]
    users: int = 8
    timeout_s: float = 60.0
    sent: list[Sent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "SteadyLoad":
        for i in range(self.users):
            t = threading.Thread(target=self._user, args=(self.requests(),), name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 5)

    def _user(self, requests: Iterator[tuple[str, dict]]) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                path, body = next(requests)
                start = time.monotonic()
                try:
                    r = client.post(f"{self.url}{path}", json=body)
                    status, error = r.status_code, "" if r.status_code == 200 else r.text[:300]
                except httpx.HTTPError as exc:
                    status, error = None, f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.sent.append(Sent(path, start, time.monotonic(), status, error))

    def snapshot(self) -> list[Sent]:
        with self._lock:
            return list(self.sent)


def round_robin(bodies: list[tuple[str, dict]]) -> Callable[[], Iterator[tuple[str, dict]]]:
    """A request source for SteadyLoad: all users draw from one shared cycle through `bodies`,
    so the n-th request sent is bodies[n % len] whatever the number of users."""
    shared = itertools.cycle(bodies)
    lock = threading.Lock()

    def draw() -> tuple[str, dict]:
        with lock:
            return next(shared)

    def make() -> Iterator[tuple[str, dict]]:
        return iter(draw, None)

    return make


def longest_gap(sent: list[Sent], start: float, end: float) -> float:
    """The longest time within [start, end] in which no request got a 200."""
    ends = sorted(s.end for s in sent if s.ok and start <= s.end <= end)
    points = [start, *ends, end]
    return max(b - a for a, b in zip(points, points[1:]))


def model_replica_pids(root: int) -> list[int]:
    """Pids of the capaserve model replicas among `root`'s descendants, oldest first."""
    procs = []
    for p in psutil.Process(root).children(recursive=True):
        try:
            if MODEL_REPLICA_TITLE in " ".join(p.cmdline()):
                procs.append((p.create_time(), p.pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [pid for _, pid in sorted(procs)]


def wait_until_busy(pid: int, window_s: float = 0.1, busy: float = 0.6, timeout_s: float = 10.0) -> bool:
    """Wait until process `pid` used at least `busy` of a core over the last `window_s`: a model
    replica that computes holds a call, so a kill then surely lands on work in progress (a
    replica that happened to be between calls once took none down). False on timeout."""
    proc = psutil.Process(pid)
    deadline = time.monotonic() + timeout_s
    prev_t, prev_cpu = time.monotonic(), sum(proc.cpu_times()[:2])
    while time.monotonic() < deadline:
        time.sleep(window_s)
        now, cpu = time.monotonic(), sum(proc.cpu_times()[:2])
        if cpu - prev_cpu >= busy * (now - prev_t):
            return True
        prev_t, prev_cpu = now, cpu
    return False


def replica_counts(url: str) -> dict[str, float]:
    """capaserve_replica_requests_total by replica id."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        s.labels["replica"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "capaserve_replica_requests_total"
    }


def metric_sum(url: str, name: str) -> float:
    """The sum of a metric's samples (all labels) from /metrics; a counter's `name` with its _total."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


@contextmanager
def capaserve_serve(work: Path, *flags: str, env: dict[str, str] | None = None,
                    ready_s: float = 240.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """`capaserve serve --port <free> --registry work/registry *flags` (a subprocess, on
    127.0.0.1, log in work/serve.log); yields (URL, process) once /readyz answers, and stops
    it with SIGTERM (SIGKILL after 90 s) on exit unless it already ended."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--port", str(port), "--registry", str(work / "registry"), *flags]
    with open(work / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        try:
            try:
                wait_ready(url, ready_s, proc)
            except (RuntimeError, TimeoutError) as exc:
                raise SystemExit(f"{exc}; see {work / 'serve.log'}") from None
            yield url, proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
