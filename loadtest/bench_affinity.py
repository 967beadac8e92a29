"""Adapter routing affinity and swaps on a multi-replica app, measured from its own metrics.

Starts `capaserve serve` (a subprocess, on 127.0.0.1) with two model replicas, uploads
`--adapters` synthetic adapters, sends `--requests` embeddings requests over them
(Zipf-popular, `--concurrency` at a time) and reads /metrics before and after:

- loads per adapter: adapter loads (cache misses, all replicas) / distinct adapters
  requested. 1.00 means every adapter was loaded on one replica only and its requests
  were routed there; 2.00 means both replicas loaded every adapter.
- requests per load and swaps per request: how often a request paid a load or a swap;
- requests per replica (`capaserve_replica_requests_total`): how the router spread them.

Another capaserve checkout is measured with `--tree DIR` (the server runs with DIR first on
its PYTHONPATH; this script's own imports stay on the installed tree), so a change to
routing is compared before and after on the same machine.

    python loadtest/bench_affinity.py [--adapters 8] [--requests 400] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from adapters.bundle import Task, save_bundle
from adapters.default_model import DEFAULT_MODEL_ID, default_model_dir
from adapters.synthetic import random_bundle
from adapters.tasks.model_loader import meta_spec
from loadtest.faults import capaserve_serve, replica_counts
from loadtest.run import scrape

TEXT = "the quick brown fox jumps over the lazy dog"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--max-adapters-per-replica", type=int, help="a count bound (default: derived from bytes)")
    ap.add_argument("--tree", type=Path, help="serve this capaserve checkout instead of the installed one")
    args = ap.parse_args(argv)

    spec = meta_spec(default_model_dir(), DEFAULT_MODEL_ID)
    targets = [n for n in spec.linear_shapes if n.endswith(("attention.self.query", "attention.self.value"))]
    work = Path(tempfile.mkdtemp(prefix="bench-affinity-"))
    flags = ["--replicas", "2", "--num-cpus", "1"]
    if args.max_adapters_per_replica is not None:
        flags += ["--max-adapters-per-replica", str(args.max_adapters_per_replica)]
    env = {}
    if args.tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(args.tree.resolve()), os.environ.get("PYTHONPATH", "")])
    with capaserve_serve(work, *flags, env=env) as (base, _):
        names = [f"aff-{i:02d}" for i in range(args.adapters)]
        for i, name in enumerate(names):
            bundle = random_bundle(spec, targets, seed=i, task=Task.FEATURE_EXTRACTION, std=0.05)
            body = save_bundle(bundle, work / f"{name}.safetensors").read_bytes()
            r = httpx.put(f"{base}/v1/adapters/{name}", content=body, timeout=60)
            r.raise_for_status()
        weights = [1.0 / (k + 1) ** args.zipf for k in range(len(names))]
        picks = random.Random(0).choices(names, weights, k=args.requests)
        before, counts0 = scrape(base), replica_counts(base)
        with httpx.Client(timeout=60) as client, ThreadPoolExecutor(args.concurrency) as pool:
            def send(model: str) -> int:
                return client.post(f"{base}/v1/embeddings", json={"model": model, "input": [TEXT]}).status_code

            t0 = time.perf_counter()
            codes = list(pool.map(send, picks))
            took = time.perf_counter() - t0
        after = scrape(base)
        delta = {k: after[k] - before[k] for k in after}
        loads, swaps = delta["adapter_loads"], delta["swaps"]
        used = len(set(picks))
        failed = sum(c != 200 for c in codes)
        print("| adapters requested | requests | failed | req/s | loads per adapter | requests per load | swaps per request |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {used} | {len(picks)} | {failed} | {len(picks) / took:.0f} | {loads / used:.2f} | "
              f"{len(picks) / max(loads, 1):.1f} | {swaps / len(picks):.3f} |")
        shares = {r: n - counts0.get(r, 0.0) for r, n in replica_counts(base).items()}
        print("requests per replica: " + ", ".join(f"{r} {n:.0f}" for r, n in sorted(shares.items())))
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
