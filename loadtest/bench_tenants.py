"""Fairness between tenants: tenant A sends 8x tenant B's request rate; B must not notice.

One `capaserve serve` (MiniLM, a temp registry, `--tenant-requests-per-s` between B's rate
and A's) with one adapter per tenant (`a/fe`, `b/fe`) uploaded by each tenant's writer key.
Keys are made in the registry store before the server starts (`capaserve keys`' code).
Open-loop senders (requests start on a fixed schedule, whatever the answers):

1. B alone at `--rate-b` requests/s for `--seconds`: B's p50/p99 latency;
2. B at `--rate-b` and A at 8x that, side by side for `--seconds`: B's p50/p99 again, and
   each tenant's 429 count.

Prints one table and the ratio B's p99 side by side / B's p99 alone (goal: <= 1.5), A's 429s
(goal: > 0) and B's 429s (goal: 0). Last, B's key asks for A's
adapter and for an absent name (50 each, interleaved, within its quota): both must be the
same 404 (body with the name replaced) in the same time (medians). `--quick` runs 10 s phases.

    python -m loadtest.bench_tenants --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from loadtest.bench_failover import make_adapters
from loadtest.faults import capaserve_serve


def open_loop(url: str, key: str, model: str, rate: float, seconds: float) -> list[tuple[int, float]]:
    """(status, seconds) of each request sent at `rate`/s for `seconds` (0: the request failed)."""
    out: list[tuple[int, float]] = []
    lock = threading.Lock()
    body = {"model": model, "input": ["a short sentence to embed for the tenant benchmark"] * 4}
    client = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=64))

    def one() -> None:
        start = time.perf_counter()
        try:
            code = client.post(f"{url}/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"}).status_code
        except httpx.HTTPError:
            code = 0
        with lock:
            out.append((code, time.perf_counter() - start))

    n = int(rate * seconds)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=64) as pool:
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one)
    client.close()
    return out


def not_found_timing(url: str, key: str, other: str, absent: str, n: int, rate: float) -> dict[str, object]:
    """`n` requests each (interleaved, one at a time, at most `rate`/s: within the tenant's
    quota) for another tenant's adapter and for an absent name, with the same key: statuses,
    median and p90 ms of each, and whether the bodies are the same once each name is replaced
    by a placeholder."""
    times: dict[str, list[float]] = {other: [], absent: []}
    codes: dict[str, set[int]] = {other: set(), absent: set()}
    bodies: dict[str, set[str]] = {other: set(), absent: set()}
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        t0 = time.perf_counter()
        for i in range(2 * n + 10):
            time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            name = (other, absent)[i % 2]
            start = time.perf_counter()
            r = client.post(f"{url}/v1/embeddings", json={"model": name, "input": ["hello"]})
            took = time.perf_counter() - start
            if i >= 10:  # the first ones warm both paths
                times[name].append(took)
                codes[name].add(r.status_code)
                bodies[name].add(r.text.replace(name, "<name>"))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {"codes": codes, "median_ms": med, "p90_ms": {k: p(v, 90) * 1000 for k, v in times.items()},
            "same_body": bodies[other] == bodies[absent] and len(bodies[other]) == 1,
            "ratio": med[other] / med[absent]}


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summary(rows: list[tuple[int, float]]) -> dict[str, float]:
    ok = [s for code, s in rows if code == 200]
    return {"sent": len(rows), "ok": len(ok), "429": sum(1 for c, _ in rows if c == 429),
            "other": sum(1 for c, _ in rows if c not in (200, 429)),
            "p50_ms": p(ok, 50) * 1000, "p99_ms": p(ok, 99) * 1000}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate-b", type=float, default=2.0, help="Tenant B's requests/s (A sends 8x).")
    ap.add_argument("--quota", type=float, default=None, help="--tenant-requests-per-s (default: 3x B's rate).")
    ap.add_argument("--seconds", type=float, default=30.0, help="Length of each phase.")
    ap.add_argument("--quick", action="store_true", help="10 s phases.")
    args = ap.parse_args(argv)
    seconds = 10.0 if args.quick else args.seconds
    quota = args.quota or 3 * args.rate_b

    from adapters.registry.backends import open_store
    from adapters.registry.keys import KeyStore, Role

    work = Path(tempfile.mkdtemp(prefix="bench-tenants-"))
    keys = KeyStore(open_store(str(work / "registry")))
    key = {t: keys.create(t, Role.writer).key for t in ("a", "b")}
    (_, bundle), = make_adapters(work, embed=1, classify=0).items()
    with capaserve_serve(work, "--tenant-requests-per-s", str(quota), "--num-cpus", "1") as (url, _proc):
        for t in ("a", "b"):
            r = httpx.put(f"{url}/v1/adapters/{t}/fe", content=bundle, headers={"Authorization": f"Bearer {key[t]}"},
                          timeout=60)
            r.raise_for_status()
            open_loop(url, key[t], f"{t}/fe", 1.0, 2.0)  # warm: the adapter loaded on the replica
        alone = summary(open_loop(url, key["b"], "b/fe", args.rate_b, seconds))
        results: dict[str, list[tuple[int, float]]] = {}
        threads = [threading.Thread(target=lambda t=t, r=r: results.__setitem__(t, open_loop(url, key[t], f"{t}/fe", r, seconds)))
                   for t, r in (("a", 8 * args.rate_b), ("b", args.rate_b))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        both_a, both_b = summary(results["a"]), summary(results["b"])
        time.sleep(1.0)  # B's quota window empties
        hidden = not_found_timing(url, key["b"], "a/fe", "a/nothing", 50, 0.8 * quota)
    print(f"B at {args.rate_b:g}/s, A at {8 * args.rate_b:g}/s, quota {quota:g} requests/s per tenant, {seconds:g} s phases")
    print("| phase | tenant | sent | 200 | 429 | other | p50 ms | p99 ms |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for phase, tenant, s in (("alone", "B", alone), ("side by side", "B", both_b), ("side by side", "A", both_a)):
        print(f"| {phase} | {tenant} | {s['sent']} | {s['ok']} | {s['429']} | {s['other']} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} |")
    ratio = both_b["p99_ms"] / alone["p99_ms"]
    print(f"B p99 side by side / alone: {ratio:.2f} (goal <= 1.5); A 429s: {both_a['429']} (goal > 0); "
          f"B 429s: {both_b['429']} (goal 0)")
    med, p90 = hidden["median_ms"], hidden["p90_ms"]
    print(f"B asking for A's adapter a/fe against an absent a/nothing, 50 each, interleaved: statuses "
          f"{sorted(hidden['codes']['a/fe'])} / {sorted(hidden['codes']['a/nothing'])}, same body: {hidden['same_body']}, "
          f"median {med['a/fe']:.2f} / {med['a/nothing']:.2f} ms (ratio {hidden['ratio']:.3f}), "
          f"p90 {p90['a/fe']:.2f} / {p90['a/nothing']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
