"""Many adapters in round-robin against a few, side by side on one server: does the count thrash?

Starts `capaserve serve` (a subprocess, on 127.0.0.1), registers `--adapters` synthetic
embedding adapters (query/value of every layer, r=8, d=2), loads each once, then runs a
closed loop of `--users` clients in alternating phases of `--duration` seconds: round-robin
over the first `--few` adapters, then round-robin over all of them (`--rounds` times, the
order reversed each round). Per phase it reads from /metrics the adapter loads (cache
misses), the adapter cache bytes of the replicas, and the model replicas' resident memory.

    python loadtest/bench_many_adapters.py [--quick] [--adapters 300] [--few 5] [-- SERVE_FLAGS]

`-- --max-adapters-per-replica 64` serves with a count bound of 64 adapters per replica instead.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

import httpx
import psutil

from adapters.bundle import Task, save_bundle
from adapters.default_model import DEFAULT_MODEL_ID, default_model_dir
from adapters.synthetic import random_bundle
from adapters.tasks.model_loader import meta_spec
from loadtest.faults import SteadyLoad, capaserve_serve, metric_sum, model_replica_pids, round_robin
from serving.config import EngineConfig, parse_bytes

TEXT = "the quick brown fox jumps over the lazy dog"
#: whose CPU per request the table shows: process command-line markers
CPU_OF = {"model": "ServeReplica:capaserve:CapaserveModel", "ingress": "ServeReplica:capaserve:CapaserveIngress"}
MiB = 1024**2


def register(url: str, count: int, folder: Path) -> list[str]:
    spec = meta_spec(default_model_dir(), DEFAULT_MODEL_ID)
    targets = [n for n in spec.linear_shapes if n.endswith(("attention.self.query", "attention.self.value"))]
    names = [f"many-{i:03d}" for i in range(count)]

    def put(i: int) -> None:
        bundle = random_bundle(spec, targets, seed=i, task=Task.FEATURE_EXTRACTION, std=0.05)
        body = save_bundle(bundle, folder / f"{names[i]}.safetensors").read_bytes()
        httpx.put(f"{url}/v1/adapters/{names[i]}", content=body, timeout=120).raise_for_status()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put, range(count)))
    return names


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


def phase(url: str, names: list[str], users: int, seconds: float, root: int) -> dict[str, float]:
    bodies = [("/v1/embeddings", {"model": n, "input": [TEXT]}) for n in names]
    loads0 = metric_sum(url, "capaserve_adapter_cache_misses_total")
    cpu0 = {k: cpu_seconds(root, t) for k, t in CPU_OF.items()}
    with SteadyLoad(url, round_robin(bodies), users=users) as load:
        time.sleep(seconds)
    cpu = {k: cpu_seconds(root, t) - cpu0[k] for k, t in CPU_OF.items()}
    sent = load.snapshot()
    ok = sum(s.ok for s in sent)
    loads = metric_sum(url, "capaserve_adapter_cache_misses_total") - loads0
    rss = sum(psutil.Process(p).memory_info().rss for p in model_replica_pids(root))
    return {
        "adapters": len(names), "requests": ok, "failed": len(sent) - ok, "rps": ok / seconds, "loads": loads,
        "cache_bytes": metric_sum(url, "capaserve_adapter_cache_bytes"), "rss": rss,
        **{f"cpu_ms_{k}": 1000 * v / max(1, ok) for k, v in cpu.items()},
    }


def budget(serve_args: list[str]) -> int:
    """The adapter cache budget the server runs with: --adapter-cache-bytes if given, else the default."""
    if "--adapter-cache-bytes" in serve_args:
        return parse_bytes(serve_args[serve_args.index("--adapter-cache-bytes") + 1])
    return EngineConfig().adapter_cache_bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=300)
    ap.add_argument("--few", type=int, default=5)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one round of 10 s phases")
    ap.add_argument("serve_args", nargs="*", help="more `capaserve serve` flags, after --")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 10.0, 1

    work = Path(tempfile.mkdtemp(prefix="bench-many-"))
    with capaserve_serve(work, *args.serve_args) as (url, proc):
        names = register(url, args.adapters, work)
        for n in names:  # every adapter loaded once before the clock starts
            httpx.post(f"{url}/v1/embeddings", json={"model": n, "input": [TEXT]}, timeout=120).raise_for_status()
        results: dict[int, list[dict[str, float]]] = {args.few: [], args.adapters: []}
        order = [names[: args.few], names]
        for r in range(args.rounds):
            for subset in order if r % 2 == 0 else order[::-1]:
                results[len(subset)].append(phase(url, subset, args.users, args.duration, proc.pid))
        print("| adapters, round-robin | req/s (median) | failed | adapter loads per 1000 requests | "
              "adapter cache MiB (max) | model replica RSS MiB (max) | CPU ms per request: model replicas | ingress |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, rows in results.items():
            per_k = 1000 * sum(x["loads"] for x in rows) / max(1.0, sum(x["requests"] for x in rows))
            print(f"| {n} | {median(x['rps'] for x in rows):.1f} | {sum(x['failed'] for x in rows):.0f} | "
                  f"{per_k:.1f} | {max(x['cache_bytes'] for x in rows) / MiB:.0f} | {max(x['rss'] for x in rows) / MiB:.0f} | "
                  f"{median(x['cpu_ms_model'] for x in rows):.1f} | {median(x['cpu_ms_ingress'] for x in rows):.1f} |")
        ratio = median(x["rps"] for x in results[args.adapters]) / median(x["rps"] for x in results[args.few])
        print(f"throughput {args.adapters} / {args.few} adapters: {ratio:.2f} (goal >= 0.8); per round: "
              + ", ".join(f"{a['rps'] / b['rps']:.2f}" for a, b in zip(results[args.adapters], results[args.few])))
        print(f"adapter cache budget per replica: {budget(args.serve_args) / MiB:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
