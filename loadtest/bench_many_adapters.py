"""Thousands of adapters against a few, side by side on one server: throughput, tail, memory.

Starts `capaserve serve` (a subprocess, on 127.0.0.1, one model replica by default) with
`--adapters` synthetic embedding adapters (query/value of every layer, rank 8, d cycling
2, 3, 4) plus `--cold` more, committed to its registry folder before it starts. Every
adapter but the cold ones is loaded once before the clock starts. Then, per request
distribution (`--dist`: uniform random and Zipf s=1), a closed loop of `--users` clients
(one text a request) runs alternating phases of `--duration` seconds over the first
`--few` adapters and over all of them (`--rounds` times, order reversed each round). Per
phase it reads from /metrics the adapter loads (cache misses) and the adapter cache bytes,
and the model replicas' resident memory (RSS). Last, each cold adapter's first answer is
timed, one at a time, beside warm requests: the median cold first answer minus the warm p50.

    python loadtest/bench_many_adapters.py [--quick] [--adapters 2000] [--few 5] [-- SERVE_FLAGS]

Goals: throughput of many >= 0.8x that of few, p99 <= 3x, 0 failed, adapter cache bytes
within --adapter-cache-bytes, cold first answer within 50 ms of the warm p50.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

import httpx
import psutil

from adapters.bundle import Task, save_bundle
from adapters.default_model import DEFAULT_MODEL_ID, default_model_dir
from adapters.registry.local import LocalStore
from adapters.synthetic import random_bundle
from adapters.tasks.model_loader import meta_spec
from loadtest.faults import SteadyLoad, capaserve_serve, metric_sum, model_replica_pids
from serving.config import EngineConfig, parse_bytes
from serving.engine.adapter_cache import count_bound

TEXT = "the quick brown fox jumps over the lazy dog"
#: whose CPU per request the table shows: process command-line markers
CPU_OF = {"model": "ServeReplica:capaserve:CapaserveModel", "ingress": "ServeReplica:capaserve:CapaserveIngress"}
MiB = 1024**2


def register(registry: Path, count: int, folder: Path, prefix: str = "many") -> list[str]:
    """Commit `count` adapters (rank 8, d = 2, 3, 4 in turn, query/value) to the registry
    folder the server will open: the same store the server writes, without the HTTP cost."""
    spec = meta_spec(default_model_dir(), DEFAULT_MODEL_ID)
    targets = [n for n in spec.linear_shapes if n.endswith(("attention.self.query", "attention.self.value"))]
    store = LocalStore(registry)
    names = [f"{prefix}-{i:04d}" for i in range(count)]
    seed0 = 0 if prefix == "many" else 10**6
    for i, name in enumerate(names):
        bundle = random_bundle(spec, targets, rank=8, num_copies=2 + i % 3, seed=seed0 + i,
                               task=Task.FEATURE_EXTRACTION, std=0.05)
        path = save_bundle(bundle, folder / "bundle.safetensors")
        store.commit(name, path, bundle.metadata)
    return names


def sampler(names: list[str], dist: str, seed: int = 0) -> Callable[[], Iterator[tuple[str, dict]]]:
    """A request source for SteadyLoad: one shared stream of adapters drawn uniformly or by
    Zipf s=1 over `names` (rank k with weight 1/k), one text a request."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) for k in range(len(names))] if dist == "zipf" else [1.0] * len(names)
    cum = list(itertools.accumulate(weights))
    lock = threading.Lock()

    def draw() -> tuple[str, dict]:
        with lock:
            name = rng.choices(names, cum_weights=cum)[0]
        return "/v1/embeddings", {"model": name, "input": [TEXT]}

    return lambda: iter(draw, None)


def cpu_seconds(root: int, title: str) -> float:
    """CPU seconds (user + system) so far of the processes under `root` whose command line has `title`."""
    total = 0.0
    for p in psutil.Process(root).children(recursive=True):
        try:
            if title in " ".join(p.cmdline()):
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def phase(url: str, names: list[str], dist: str, users: int, seconds: float, root: int) -> dict[str, float]:
    loads0 = metric_sum(url, "capaserve_adapter_cache_misses_total")
    cpu0 = {k: cpu_seconds(root, t) for k, t in CPU_OF.items()}
    with SteadyLoad(url, sampler(names, dist), users=users) as load:
        time.sleep(seconds)
    cpu = {k: cpu_seconds(root, t) - cpu0[k] for k, t in CPU_OF.items()}
    sent = load.snapshot()
    ok = [s for s in sent if s.status == 200]
    lat = sorted(s.end - s.start for s in ok)
    loads = metric_sum(url, "capaserve_adapter_cache_misses_total") - loads0
    rss = sum(psutil.Process(p).memory_info().rss for p in model_replica_pids(root))
    return {
        "adapters": len(names), "requests": len(ok), "failed": len(sent) - len(ok), "rps": len(ok) / seconds,
        "p50": lat[len(lat) // 2] if lat else float("nan"), "p99": lat[int(0.99 * (len(lat) - 1))] if lat else float("nan"),
        "loads": loads, "cache_bytes": metric_sum(url, "capaserve_adapter_cache_bytes"), "rss": rss,
        **{f"cpu_ms_{k}": 1000 * v / max(1, len(ok)) for k, v in cpu.items()},
    }


def first_answers(url: str, cold: list[str], warm: list[str]) -> tuple[float, float, int]:
    """(median cold first answer s, warm p50 s, failures): each cold adapter's first request,
    one at a time, each after three requests to warm adapters that give the warm p50."""
    colds: list[float] = []
    warms: list[float] = []
    failed = 0
    rng = random.Random(1)
    with httpx.Client(timeout=120) as client:
        def timed(name: str) -> float:
            nonlocal failed
            t0 = time.monotonic()
            r = client.post(f"{url}/v1/embeddings", json={"model": name, "input": [TEXT]})
            failed += r.status_code != 200
            return time.monotonic() - t0

        for name in cold:
            warms += [timed(rng.choice(warm)) for _ in range(3)]
            colds.append(timed(name))
    return median(colds), median(warms), failed


def budget(serve_args: list[str]) -> int:
    """The adapter cache budget the server runs with: --adapter-cache-bytes if given, else the default."""
    if "--adapter-cache-bytes" in serve_args:
        return parse_bytes(serve_args[serve_args.index("--adapter-cache-bytes") + 1])
    return EngineConfig().adapter_cache_bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=2000)
    ap.add_argument("--few", type=int, default=5)
    ap.add_argument("--cold", type=int, default=50, help="adapters registered but not loaded: their first answers are timed")
    ap.add_argument("--dist", default="uniform,zipf", help="request distributions over the adapters, comma-separated")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one round of 10 s phases")
    ap.add_argument("serve_args", nargs="*", help="more `capaserve serve` flags, after --")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 10.0, 1
    serve_args = args.serve_args if "--replicas" in args.serve_args else ["--replicas", "1", *args.serve_args]

    work = Path(tempfile.mkdtemp(prefix="bench-many-"))
    t0 = time.monotonic()
    names = register(work / "registry", args.adapters, work)
    cold = register(work / "registry", args.cold, work, prefix="cold")
    print(f"registered {len(names)} + {len(cold)} cold adapters in {time.monotonic() - t0:.0f} s", flush=True)
    with capaserve_serve(work, *serve_args) as (url, proc):
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:  # every adapter loaded once before the clock starts
            list(pool.map(lambda n: httpx.post(f"{url}/v1/embeddings", json={"model": n, "input": [TEXT]},
                                               timeout=300).raise_for_status(), names))
        print(f"loaded {len(names)} adapters in {time.monotonic() - t0:.0f} s", flush=True)
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for dist in args.dist.split(","):
            order = [names[: args.few], names]
            for r in range(args.rounds):
                for subset in order if r % 2 == 0 else order[::-1]:
                    row = phase(url, subset, dist, args.users, args.duration, proc.pid)
                    results.setdefault((dist, len(subset)), []).append(row)
                    print(f"  round {r + 1}, {dist}, {len(subset)} adapters: {row['rps']:.1f} req/s, "
                          f"p99 {1000 * row['p99']:.0f} ms", file=sys.stderr, flush=True)
        cold_s, warm_p50, cold_failed = first_answers(url, cold, names[: args.few])
        cap = budget(serve_args)
        spec = meta_spec(default_model_dir(), DEFAULT_MODEL_ID)

    print("| distribution | adapters | req/s (median) | p50 ms | p99 ms | failed | adapter loads per 1000 requests | "
          "adapter cache MiB (max) | model replica RSS MiB (max) | CPU ms per request: model replica | ingress |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (dist, n), rows in results.items():
        per_k = 1000 * sum(x["loads"] for x in rows) / max(1.0, sum(x["requests"] for x in rows))
        print(f"| {dist} | {n} | {median(x['rps'] for x in rows):.1f} | {1000 * median(x['p50'] for x in rows):.1f} | "
              f"{1000 * median(x['p99'] for x in rows):.1f} | {sum(x['failed'] for x in rows):.0f} | {per_k:.1f} | "
              f"{max(x['cache_bytes'] for x in rows) / MiB:.0f} | {max(x['rss'] for x in rows) / MiB:.0f} | "
              f"{median(x['cpu_ms_model'] for x in rows):.1f} | {median(x['cpu_ms_ingress'] for x in rows):.1f} |")
    for dist in args.dist.split(","):
        many, few = results[(dist, args.adapters)], results[(dist, args.few)]
        rps = median(x["rps"] for x in many) / median(x["rps"] for x in few)
        p99 = median(x["p99"] for x in many) / median(x["p99"] for x in few)
        print(f"{dist}: throughput {args.adapters} / {args.few} adapters {rps:.2f} (goal >= 0.8), "
              f"p99 {p99:.2f} (goal <= 3), failed {sum(x['failed'] for x in many + few):.0f} (goal 0); per round: "
              + ", ".join(f"{a['rps'] / b['rps']:.2f}" for a, b in zip(many, few)))
    most = max(x["cache_bytes"] for rows in results.values() for x in rows)
    print(f"adapter cache: {most / MiB:.0f} MiB held at most, budget {cap / MiB:.0f} MiB "
          f"({'within' if most <= cap else 'OVER'}); multiplexer count bound from bytes: "
          f"{count_bound(cap, spec.linear_shapes.values())}")
    print(f"cold first answer (median of {len(cold)}): {1000 * cold_s:.1f} ms, warm p50 {1000 * warm_p50:.1f} ms, "
          f"difference {1000 * (cold_s - warm_p50):.1f} ms (goal <= 50), failed {cold_failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
