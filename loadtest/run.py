"""Load-test capaserve end to end and write a report: is serving N adapters as cheap as one?

One invocation (also `capaserve loadtest`):

1. Starts a local Ray cluster with TWO apps on 127.0.0.1: the scheduler as built at `/`
   (grouping on) and the swap-per-request baseline at `/baseline`
   (`config_of(grouping=False)`, i.e. `--no-grouping`), sharing one registry folder. Locust targets each app's
   ingress replica directly (Serve direct ingress; `--ingress proxy` goes through Serve's
   HTTP proxy instead, one more hop for every request). Or it targets `--url` (and
   optionally `--baseline-url`), loopback only.
2. Registers N synthetic CapaBoost adapters over HTTP (PUT /v1/adapters/{name}); their
   shapes come from a BaseModelSpec of the base built on the meta device (no weights).
3. Computes reference answers with single requests on the quiet grouped app, and the
   same on the baseline app: they must agree (and this loads every adapter on both).
4. Runs Locust headless (a subprocess, so gevent never patches this process) once per
   configuration: the single-adapter run (N=1), the grouped app over the `--adapters` x
   `--zipf` sweep, and the baseline over `--adapters` at the goal's Zipf s. The three
   configurations the goals compare run first and next to each other, and with
   `--rounds` > 1 every round runs in the reverse order of the previous one, so drifting
   machine load hits them alike (per-configuration results are medians over rounds).
5. Reads swaps and batch sizes from /metrics before and after each run, and writes
   Locust CSVs, results.json, summary.md and PNG plots to `--out` (loadtest.report).

    python loadtest/run.py --adapters 1,10,50 --zipf 0.5,1.0,1.5 --users 32 --duration 25
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm import tqdm

from loadtest import report
from loadtest.scenario import ATOL_BY_DTYPE, PATHS, RunSummary, adapter_names, compute_references, request_body
from serving.config import EngineConfig
from serving.config_sources import ConfigError, add_model_flags, config_of, model_from_namespace

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
App = Literal["grouped", "baseline"]
log = logging.getLogger("capaserve.loadtest")

#: Which Linear layers the synthetic adapters target, by module-path suffix.
TARGET_SETS: dict[str, tuple[str, ...]] = {
    # PEFT's default for BERT-like models (and the LoRA paper's choice)
    "qv": ("attention.self.query", "attention.self.value", "q_proj", "v_proj", "c_attn"),
    "attn": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "attn.c_proj"),
    "all": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "intermediate.dense", "output.dense", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
            "down_proj", "c_attn", "c_proj", "c_fc"),
}


class LoadTestConfig(BaseModel):
    """What one load-test invocation runs, against what, and where the report goes."""
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # --- the server
    model: str | None = Field(
        None, description="Base model folder or cached id.", json_schema_extra={"default_doc": "the embedded MiniLM"}
    )
    served_model_name: str | None = Field(
        None, description="Base model id clients send.", json_schema_extra={"default_doc": "the model id"}
    )
    url: str | None = Field(None, description="Target this running server (loopback) instead of starting one.")
    baseline_url: str | None = Field(None, description="With --url: a grouping-off server to compare against.")
    admin_token: str | None = Field(None, description="Bearer token for registry writes on a --url server.")
    replicas: int = Field(1, ge=1, description="Model replicas per started app.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs (torch threads) per model replica of a started app.")
    max_batch_size: int = Field(16, ge=1, description="Scheduler batch cap of the started apps.")
    batch_wait_ms: float = Field(5.0, ge=0, description="Scheduler batch-fill wait of the started apps.")
    ingress: Literal["direct", "proxy"] = Field(
        "direct",
        description="How Locust reaches a started app: its ingress replica's own HTTP server (Serve direct "
        "ingress, as a load balancer in front of a cluster would) or Serve's HTTP proxy (one more hop).",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Weight dtype of the started apps (and the check tolerance for --url servers)."
    )
    # --- the adapters
    targets: Literal["qv", "attn", "all"] = Field("qv", description="Layers the synthetic adapters adapt.")
    adapter_task: Literal["auto", "sequence-classification", "question-answering", "feature-extraction"] = Field(
        "auto",
        description="Task of the synthetic adapters; auto: causal-lm on a causal LM, image-classification on an "
        "image base, else sequence-classification.",
    )
    rank: int = Field(8, ge=1, description="r of the synthetic adapters.")
    num_copies: int = Field(2, ge=1, description="d (masks per factor) of the synthetic adapters.")
    # --- the load
    adapters: list[int] = Field(default_factory=lambda: [1, 10, 50], description="Sweep of N adapters.")
    zipf: list[float] = Field(default_factory=lambda: [0.5, 1.0, 1.5], description="Sweep of Zipf exponents s.")
    goal_adapters: int = Field(50, ge=1, description="N of the goal comparison.")
    goal_zipf: float = Field(1.0, ge=0, description="Zipf s of the goal comparison (and of the baseline sweep).")
    users: int = Field(32, ge=1, description="Concurrent closed-loop Locust users.")
    spawn_rate: float | None = Field(
        None, gt=0, description="Users started per second.", json_schema_extra={"default_doc": "all in one second"}
    )
    duration_s: float = Field(
        25.0, gt=0, description="Seconds of load per configuration and round.", json_schema_extra={"flag": "duration"}
    )
    rounds: int = Field(1, ge=1, description="Repetitions of the whole plan (alternating order); medians reported.")
    mix: str = Field("auto", description="Endpoint weights, e.g. embeddings=1,classify=1; auto: all supported.")
    texts_per_request: int = Field(1, ge=1, description="Inputs per embeddings/classify request.")
    check_fraction: float = Field(0.1, ge=0, le=1, description="Share of answers compared with the references.")
    baseline: bool = Field(True, description="Also run the swap-per-request baseline app.")
    single: bool = Field(True, description="Also run the single-adapter configuration (N=1).")
    seed: int = Field(0, description="Seed of adapters and request draws.")
    # --- the report
    out: Path = Field(HERE / "results", description="Report folder.", json_schema_extra={"default_doc": "loadtest/results"})
    progress: bool = Field(True, description="Show a progress bar.")

    @field_validator("url", "baseline_url")
    @classmethod
    def _loopback(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host = urlparse(v).hostname
        if host not in LOOPBACK:
            raise ValueError(f"the load test only targets loopback servers (127.0.0.1, localhost, ::1), not {host!r}")
        return v.rstrip("/")

    @field_validator("adapters")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError(f"adapters must be a non-empty list of counts >= 1, got {v}")
        return sorted(set(v))

    @field_validator("zipf")
    @classmethod
    def _exponents(cls, v: list[float]) -> list[float]:
        if not v or any(s < 0 or not math.isfinite(s) for s in v):
            raise ValueError(f"zipf must be a non-empty list of finite exponents >= 0, got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _baseline_needs_server(self) -> "LoadTestConfig":
        if self.url is not None and self.baseline_url is None:
            self.baseline = False
        return self

    def max_adapters(self) -> int:
        return max([*self.adapters, self.goal_adapters])


class Case(BaseModel):
    """One configuration: which app, over how many adapters, how skewed."""
    model_config = ConfigDict(frozen=True)

    app: App
    adapters: int
    zipf: float

    @property
    def label(self) -> str:
        s = "-" if self.adapters == 1 else f"{self.zipf:g}"
        return f"{self.app} N={self.adapters} s={s}"

    @property
    def slug(self) -> str:
        return f"{self.app}-n{self.adapters}-s{self.zipf:g}"


class CaseResult(BaseModel):
    """One Locust run of one case: Locust's numbers plus the server's swap and batch counters."""
    case: Case
    round: int
    duration_s: float
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p99_ms: float
    avg_ms: float
    checked: int
    contaminated: int
    swaps: float
    swaps_per_s: float
    mean_batch: float | None
    adapter_loads: float
    samples: list[str] = Field(default_factory=list)
    by_endpoint: dict[str, dict[str, float]] = Field(default_factory=dict)


def plan(cfg: LoadTestConfig) -> list[Case]:
    """The cases of one round: the goal trio first and side by side, then the rest of the sweep."""
    s0, n0 = cfg.goal_zipf, cfg.goal_adapters
    cases = [Case(app="grouped", adapters=1, zipf=s0)] if cfg.single else []
    cases.append(Case(app="grouped", adapters=n0, zipf=s0))
    if cfg.baseline:
        cases.append(Case(app="baseline", adapters=n0, zipf=s0))
    for n in cfg.adapters:
        if n == 1 and not cfg.single:
            continue
        for s in cfg.zipf if n > 1 else [s0]:
            cases.append(Case(app="grouped", adapters=n, zipf=s))
        if cfg.baseline:
            cases.append(Case(app="baseline", adapters=n, zipf=s0))
    seen: set[Case] = set()
    return [c for c in cases if not (c in seen or seen.add(c))]


def schedule(cases: list[Case], rounds: int) -> list[tuple[int, Case]]:
    """Every round runs the cases in the reverse order of the round before."""
    out: list[tuple[int, Case]] = []
    for r in range(rounds):
        out.extend((r, c) for c in (cases if r % 2 == 0 else cases[::-1]))
    return out


# ---------------------------------------------------------------------------- server side


def base_spec(cfg: LoadTestConfig) -> Any:
    """The base's BaseModelSpec (names and shapes of its Linear layers), built on the meta device."""
    from adapters.tasks.model_loader import meta_spec, model_source  # deferred: torch

    econf = EngineConfig(model=cfg.model, served_model_name=cfg.served_model_name)
    return meta_spec(model_source(econf), econf.served_name())


def target_paths(cfg: LoadTestConfig, spec: Any) -> list[str]:
    """The base's Linear layers in the chosen target set."""
    suffixes = TARGET_SETS[cfg.targets]
    targets = [n for n in spec.linear_shapes if n.endswith(suffixes)]
    if not targets:
        raise ValueError(f"no Linear layer of {spec.model_id} matches target set {cfg.targets!r} {suffixes}")
    return targets


def adapter_task(cfg: LoadTestConfig, spec: Any) -> Any:
    """The synthetic adapters' task (`--adapter-task`; auto follows the base)."""
    from adapters.bundle import Task  # deferred: torch

    if spec.task is Task.CAUSAL_LM:
        return Task.CAUSAL_LM
    if spec.modality == "image":
        return Task.IMAGE_CLASSIFICATION if cfg.adapter_task in ("auto", "sequence-classification") else Task(cfg.adapter_task)
    return Task.SEQUENCE_CLASSIFICATION if cfg.adapter_task == "auto" else Task(cfg.adapter_task)


def make_bundles(cfg: LoadTestConfig, spec: Any, names: Sequence[str], folder: Path) -> dict[str, bytes]:
    """Synthetic adapters of `adapter_task`: on an encoder, classifiers by default (they serve
    embeddings and classify), or question-answering ones (embeddings and question answering)."""
    from adapters.bundle import CLASSIFICATION_TASKS, save_bundle  # deferred: torch
    from adapters.synthetic import random_bundle

    targets = target_paths(cfg, spec)
    task = adapter_task(cfg, spec)
    out: dict[str, bytes] = {}
    for i, name in enumerate(names):
        bundle = random_bundle(
            spec, targets, rank=cfg.rank, num_copies=cfg.num_copies, seed=cfg.seed * 100_003 + i, task=task,
            labels=["negative", "neutral", "positive"] if task in CLASSIFICATION_TASKS else None, std=0.1,
            description=f"capaserve load test adapter {i}",
        )
        out[name] = save_bundle(bundle, folder / f"{name}.safetensors").read_bytes()
    return out


def register(url: str, bundles: dict[str, bytes], admin_token: str | None) -> None:
    import httpx  # the loadtest extra: imported when used, so the flags load without it
    headers = {"Content-Type": "application/octet-stream"}
    if admin_token:
        headers["Authorization"] = f"Bearer {admin_token}"
    with httpx.Client(base_url=url, timeout=120) as client:
        for name, data in bundles.items():
            r = client.put(f"/v1/adapters/{name}", content=data, headers=headers)
            if r.status_code != 201:
                raise RuntimeError(f"registering {name}: HTTP {r.status_code}: {r.text[:300]}")


def wait_ready(url: str, timeout_s: float = 180.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until `url/readyz` answers 200; fail early if `proc` (the server, if we started it) exited."""
    import httpx  # the loadtest extra: imported when used, so the flags load without it
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with status {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} was not ready within {timeout_s:.0f} s")
        time.sleep(0.3)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, drawn from 20000-29999: outside the kernel's ephemeral
    range (32768-60999 by default), which the many port-0 binds of a starting Ray cluster draw
    from (a port taken from it was once bound by Ray between this call and the server's own
    bind), and outside Ray's worker ports (10002-19999) and Serve's direct-ingress ports (30000 up)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # that range is full: any port the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_apps(cfg: LoadTestConfig) -> Iterator[dict[str, str]]:
    """Both apps in one local Ray cluster on 127.0.0.1; yields {app: base URL}; shuts all down.

    A URL is the app's ingress replica's own server with `ingress="direct"` (one replica per
    app, so no balancing is lost), else the shared proxy's route prefix.
    """
    from serving.ray_local import direct_ingress_urls, init_local_ray, use_serve_env

    use_serve_env()  # before ray.serve is imported
    import ray
    from ray import serve

    from serving.app import build_app

    registry = tempfile.mkdtemp(prefix="capaserve-loadtest-registry-")
    port = free_port()
    common = dict(
        model=cfg.model, served_model_name=cfg.served_model_name, host="127.0.0.1", port=port, registry=registry,
        replicas=cfg.replicas, num_cpus=cfg.num_cpus, max_batch_size=cfg.max_batch_size,
        batch_wait_ms=cfg.batch_wait_ms, max_adapters_per_replica=max(16, cfg.max_adapters()),
        max_queue=max(256, 4 * cfg.users), dtype=cfg.dtype,
    )
    apps: dict[str, tuple[str, Any]] = {"grouped": ("/", config_of(**common, grouping=True))}
    if cfg.baseline:
        apps["baseline"] = ("/baseline", config_of(**common, grouping=False))
    # Logical CPUs: every replica of both apps must fit, whatever the core count (they take turns).
    need = math.ceil(cfg.num_cpus * cfg.replicas * len(apps))
    init_local_ray(max(need, os.cpu_count() or 1), log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        urls: dict[str, str] = {}
        for name, (prefix, args) in apps.items():
            serve.run(build_app(args), name=f"capaserve-{name}", route_prefix=prefix, blocking=False)
            urls[name] = f"http://127.0.0.1:{port}{prefix.rstrip('/')}"
        for url in urls.values():
            wait_ready(url)
        if cfg.ingress == "direct":
            for name in urls:
                direct = direct_ingress_urls(f"capaserve-{name}", "127.0.0.1")
                if not direct:
                    raise RuntimeError("Serve direct ingress is off (RAY_SERVE_ENABLE_DIRECT_INGRESS=0): use --ingress proxy")
                urls[name] = direct[0]
                wait_ready(urls[name])
        yield urls
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(registry, ignore_errors=True)


# ---------------------------------------------------------------------------- measuring


def scrape(url: str, admin_token: str | None = None) -> dict[str, float]:
    """Sums of the counters the report needs, from the app's /metrics (which needs an admin key
    once the server has keys)."""
    import httpx  # the loadtest extra: imported when used, so the flags load without it

    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    text = httpx.get(f"{url}/metrics", timeout=30, headers=headers).text
    want = {
        "capaserve_adapter_swaps_total": "swaps",
        "capaserve_batch_size_requests_sum": "batched_requests",
        "capaserve_batch_size_requests_count": "batches",
        "capaserve_adapter_cache_misses_total": "adapter_loads",
    }
    out = dict.fromkeys(want.values(), 0.0)
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name in want:
                out[want[sample.name]] += sample.value
    return out


def flush_reports(url: str, adapter: str, kind: str, item: Any) -> None:
    """One small request, so the replica hands over the metric events of the run's last answers."""
    import httpx  # the loadtest extra: imported when used, so the flags load without it
    httpx.post(f"{url}{PATHS[kind]}", json=request_body(kind, adapter, [item]), timeout=60)  # type: ignore[index]


def read_stats(prefix: Path) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Locust's Aggregated row and the per-endpoint rows of <prefix>_stats.csv."""
    rows = list(csv.DictReader(open(f"{prefix}_stats.csv", newline="")))

    def nums(row: dict[str, str]) -> dict[str, float]:
        keys = {"Request Count": "requests", "Failure Count": "failures", "Requests/s": "rps", "50%": "p50_ms",
                "99%": "p99_ms", "Average Response Time": "avg_ms"}
        return {v: float(row[k]) if row.get(k) not in (None, "", "N/A") else 0.0 for k, v in keys.items()}

    agg = next((nums(r) for r in rows if r["Name"] == "Aggregated"), None)
    if agg is None:
        raise RuntimeError(f"{prefix}_stats.csv has no Aggregated row")
    return agg, {r["Name"]: nums(r) for r in rows if r["Name"] != "Aggregated"}


def run_locust(
    cfg: LoadTestConfig, case: Case, url: str, csv_dir: Path, refs: Path, rnd: int, tick: Any = None
) -> tuple[Path, Path]:
    """Run one headless Locust process for `case`; returns its CSV prefix and summary file."""
    prefix = csv_dir / f"{case.slug}-r{rnd}"
    summary = Path(f"{prefix}_summary.json")
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-u", str(cfg.users), "-r", str(cfg.spawn_rate or cfg.users), "-t", f"{cfg.duration_s:g}s",
        "--stop-timeout", "30", "--csv", str(prefix), "--host", url, "--loglevel", "WARNING",
        "--adapters", str(case.adapters), "--zipf-s", f"{case.zipf:g}", "--mix", cfg.mix,
        "--texts-per-request", str(cfg.texts_per_request), "--check-fraction", f"{cfg.check_fraction:g}",
        "--atol", f"{ATOL_BY_DTYPE[cfg.dtype]:g}",
        "--reference-file", str(refs), "--summary-file", str(summary), "--seed", str(cfg.seed + 7919 * rnd),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the locustfile imports the installed loadtest package
    logfile = open(f"{prefix}_locust.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT)
    start = time.monotonic()
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if tick is not None:
                tick(min(time.monotonic() - start, cfg.duration_s))
            if time.monotonic() - start > cfg.duration_s + 120:
                proc.kill()  # our own child, by its handle
                raise TimeoutError(f"locust for {case.label} did not finish; see {prefix}_locust.log")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        logfile.close()
    # Locust exits 1 when any request failed; that is reported, not a crash. Missing CSVs are.
    if not Path(f"{prefix}_stats.csv").exists() or not summary.exists():
        tail = Path(f"{prefix}_locust.log").read_text()[-2000:]
        raise RuntimeError(f"locust for {case.label} wrote no results (exit {proc.returncode}):\n{tail}")
    return prefix, summary


def measure(cfg: LoadTestConfig, case: Case, rnd: int, url: str, csv_dir: Path, refs: Path, kind: str,
            item: Any, tick: Any = None) -> CaseResult:

    before = scrape(url, cfg.admin_token)
    prefix, summary_path = run_locust(cfg, case, url, csv_dir, refs, rnd, tick)
    flush_reports(url, "lt-000", kind, item)
    after = scrape(url, cfg.admin_token)
    agg, per = read_stats(prefix)
    summary = RunSummary.model_validate_json(summary_path.read_text())
    d = {k: after[k] - before[k] for k in after}
    return CaseResult(
        case=case, round=rnd, duration_s=cfg.duration_s, requests=int(agg["requests"]), failures=int(agg["failures"]),
        rps=agg["rps"], p50_ms=agg["p50_ms"], p99_ms=agg["p99_ms"], avg_ms=agg["avg_ms"],
        checked=summary.checked, contaminated=summary.contaminated, swaps=d["swaps"],
        swaps_per_s=d["swaps"] / cfg.duration_s, mean_batch=d["batched_requests"] / d["batches"] if d["batches"] else None,
        adapter_loads=d["adapter_loads"], samples=summary.samples, by_endpoint=per,
    )


def compare_references(a: Any, b: Any, atol: float = 1e-4) -> list[str]:
    """Differences between two servers' reference answers (they serve the same weights)."""
    problems: list[str] = []
    for name, ra in a.adapters.items():
        rb = b.adapters.get(name)
        if rb is None:
            problems.append(f"{name}: missing")
            continue
        for field in ("embeddings", "probs"):
            xa, xb = getattr(ra, field), getattr(rb, field)
            if xa is not None and (xb is None or any(abs(p - q) > atol for u, v in zip(xa, xb) for p, q in zip(u, v))):
                problems.append(f"{name}: {field} differ")
        for field in ("labels", "completions"):
            if getattr(ra, field) != getattr(rb, field):
                problems.append(f"{name}: {field} differ")
        if ra.answers is not None and (rb.answers is None or any(
            (x.answer, x.start, x.end) != (y.answer, y.start, y.end) or abs(x.score - y.score) > atol
            for x, y in zip(ra.answers, rb.answers)
        )):
            problems.append(f"{name}: answers differ")
    return problems


# ---------------------------------------------------------------------------- the run


def run(cfg: LoadTestConfig) -> Path:
    """Run the whole plan and write the report; returns the summary.md path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg.out.mkdir(parents=True, exist_ok=True)
    csv_dir = cfg.out / "csv"
    shutil.rmtree(csv_dir, ignore_errors=True)
    csv_dir.mkdir()
    names = adapter_names(cfg.max_adapters())
    spec = base_spec(cfg)
    kind = "completions" if spec.task.value == "causal-lm" else "embeddings"
    with tempfile.TemporaryDirectory(prefix="capaserve-loadtest-bundles-") as tmp:
        bundles = make_bundles(cfg, spec, names, Path(tmp))
    bundle_kib = sum(map(len, bundles.values())) / len(bundles) / 1024
    load_before = os.getloadavg()
    started = time.time()

    @contextmanager
    def servers() -> Iterator[dict[str, str]]:
        if cfg.url is not None:
            urls = {"grouped": cfg.url}
            if cfg.baseline_url:
                urls["baseline"] = cfg.baseline_url
            for u in urls.values():
                wait_ready(u)
            yield urls
        else:
            with local_apps(cfg) as urls:
                yield urls

    results: list[CaseResult] = []
    notes: list[str] = []
    with servers() as urls:
        log.info("apps ready: %s", urls)
        register(urls["grouped"], bundles, cfg.admin_token)
        refs_path = csv_dir / "references.json"
        refs = compute_references(urls["grouped"], names)
        refs.save(refs_path)
        if "baseline" in urls:  # also loads every adapter on the baseline app before it is measured
            problems = compare_references(refs, compute_references(urls["baseline"], names), ATOL_BY_DTYPE[cfg.dtype])
            if problems:
                notes.append(f"grouped and baseline apps disagree on single-request answers: {problems[:5]}")
        steps = schedule(plan(cfg), cfg.rounds)
        bar = tqdm(total=len(steps) * cfg.duration_s, unit="s", disable=not cfg.progress,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]")
        try:
            for i, (rnd, case) in enumerate(steps):
                bar.set_description(f"[{i + 1}/{len(steps)}] {case.label}")
                done = i * cfg.duration_s

                def tick(t: float, done: float = done) -> None:
                    bar.n = done + t
                    bar.refresh()

                res = measure(cfg, case, rnd, urls[case.app], csv_dir, refs_path, kind, refs.texts[0], tick)
                results.append(res)
                bar.n = done + cfg.duration_s
                bar.set_postfix_str(f"{res.rps:.1f} req/s, p99 {res.p99_ms:.0f} ms, {res.failures} failed")
        finally:
            bar.close()
    info = report.RunInfo(
        model=spec.model_id, task=f"{spec.modality} {spec.task.value} base, {adapter_task(cfg, spec).value} adapters",
        targets=cfg.targets, n_targets=len(target_paths(cfg, spec)),
        bundle_kib=bundle_kib, cpu_count=os.cpu_count() or 0, load_before=list(load_before),
        load_after=list(os.getloadavg()), started=started, wall_s=time.time() - started,
        config=json.loads(cfg.model_dump_json()), notes=notes,
    )
    return report.write(cfg.out, info, results, goal_adapters=cfg.goal_adapters, goal_zipf=cfg.goal_zipf)


# ---------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(p, LoadTestConfig)
    ns = p.parse_args(argv)
    try:
        cfg = model_from_namespace(LoadTestConfig, ns)
    except ConfigError as exc:
        p.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    summary = run(cfg)
    print(summary.read_text())
    print(f"report: {summary.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
