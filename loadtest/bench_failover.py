"""`kill -9` of one of two model replicas under steady load: what is lost, who takes over.

Starts `capaserve serve --replicas 2` (a subprocess, on 127.0.0.1), registers embedding and
classification adapters, and runs a closed loop of `--users` clients over them (and the
base) round-robin. After `--warmup` seconds, at a moment it is computing, it SIGKILLs one
model replica (by pid, among the processes of the server it started), keeps the load on,
and reads the per-replica request counts (`capaserve_replica_requests_total`) every half
second until the replacement replica has answered for `--window` seconds (at most
`--after` seconds after the kill). It prints one table row:

- failed: requests without a 200 (any status, or a cut connection), after the kill;
- retries: replica calls the ingress sent once more (`capaserve_replica_retries_total`);
- longest gap: the longest time after the kill in which no request got an answer;
- new replica first answer: seconds from the kill to the replacement's first answer;
- new replica share: its part of all answers in the `--window` seconds after that,
  and in the last `--window` seconds (1/2 is an even split of two replicas).

    python loadtest/bench_failover.py [--quick] [--users 8] [--warmup 8] [--after 60] [--window 10] [-- SERVE_FLAGS]

`-- --affinity-load-factor 1000` approximates Serve's own multiplexed routing (affinity
never yields to load), for a before/after comparison on the same machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from adapters.bundle import Task, save_bundle
from adapters.default_model import DEFAULT_MODEL_ID, default_model_dir
from adapters.synthetic import random_bundle
from loadtest.faults import (
    SteadyLoad,
    capaserve_serve,
    longest_gap,
    metric_sum,
    model_replica_pids,
    replica_counts,
    round_robin,
    wait_until_busy,
)
from adapters.tasks.model_loader import meta_spec

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world", "a somewhat longer sentence about adapters"]
LABELS = ["neg", "pos"]


def make_adapters(folder: Path, embed: int, classify: int) -> dict[str, bytes]:
    """`embed` feature-extraction and `classify` classification bundles on the query/value layers."""
    spec = meta_spec(default_model_dir(), DEFAULT_MODEL_ID)
    targets = [n for n in spec.linear_shapes if n.endswith(("attention.self.query", "attention.self.value"))]
    out: dict[str, bytes] = {}
    for i in range(embed + classify):
        task = Task.FEATURE_EXTRACTION if i < embed else Task.SEQUENCE_CLASSIFICATION
        name = f"{'fe' if i < embed else 'cls'}-{i:02d}"
        bundle = random_bundle(spec, targets, seed=i, task=task, std=0.05,
                               labels=LABELS if task is Task.SEQUENCE_CLASSIFICATION else None)
        out[name] = save_bundle(bundle, folder / f"{name}.safetensors").read_bytes()
    return out


def request_mix(adapters: list[str]) -> list[tuple[str, dict]]:
    """One request per adapter (embeddings, or classify for a classifier) and one for the base."""
    bodies = [("/v1/embeddings", {"model": DEFAULT_MODEL_ID, "input": TEXTS})]
    for name in adapters:
        path = "/v1/classify" if name.startswith("cls-") else "/v1/embeddings"
        bodies.append((path, {"model": name, "input": TEXTS}))
    return bodies


@dataclass
class FailoverResult:
    before: int  # requests answered before the kill
    after: int  # requests sent after the kill
    failed: int  # of those, without a 200
    errors: list[str]
    retries: float
    longest_gap_s: float
    first_answer_s: float | None  # kill -> the replacement's first answer
    share_first: float | None  # the replacement's share in the window after its first answer
    share_last: float | None  # its share in the last window
    replicas: dict[str, float]  # requests per replica over the whole run
    busy_at_kill: bool = False  # the victim was computing when it was killed (`wait_until_busy`)


def run_failover(url: str, root_pid: int, bodies: list[tuple[str, dict]], users: int = 8, warmup_s: float = 8.0,
                 after_s: float = 60.0, window_s: float = 10.0) -> FailoverResult:
    """Load `url`, SIGKILL the oldest model replica under `root_pid` after `warmup_s`, measure (see the module doc)."""
    victims = model_replica_pids(root_pid)
    if len(victims) < 2:
        raise RuntimeError(f"expected two model replicas under pid {root_pid}, found {victims}")
    retries0 = metric_sum(url, "capaserve_replica_retries_total")
    with SteadyLoad(url, round_robin(bodies), users=users) as load:
        time.sleep(warmup_s)
        known = set(replica_counts(url))
        busy = wait_until_busy(victims[0], window_s=0.3, busy=0.7)
        t_kill = time.monotonic()
        os.kill(victims[0], signal.SIGKILL)
        timeline: list[tuple[float, dict[str, float]]] = []
        first: float | None = None
        while time.monotonic() < t_kill + after_s:
            time.sleep(0.5)
            now, counts = time.monotonic(), replica_counts(url)
            timeline.append((now, counts))
            new = {r for r in counts if r not in known}
            if first is None and new:
                first = now
            if first is not None and now >= first + window_s and now >= timeline[0][0] + window_s:
                break
        load.stop()
        sent = load.snapshot()
    end = time.monotonic()
    after = [s for s in sent if s.start >= t_kill or s.end >= t_kill]
    failed = [s for s in after if not s.ok]
    replicas = timeline[-1][1] if timeline else {}
    new_ids = {r for r in replicas if r not in known}

    def share(start: float, stop: float) -> float | None:
        inside = [(t, c) for t, c in timeline if start <= t <= stop]
        if len(inside) < 2:
            return None
        (_, a), (_, b) = inside[0], inside[-1]
        total = sum(b.values()) - sum(a.values())
        gained = sum(b.get(r, 0.0) - a.get(r, 0.0) for r in new_ids)
        return gained / total if total else None

    return FailoverResult(
        before=sum(1 for s in sent if s.ok and s.end < t_kill),
        after=len(after),
        failed=len(failed),
        errors=sorted({s.error or str(s.status) for s in failed})[:5],
        retries=metric_sum(url, "capaserve_replica_retries_total") - retries0,
        longest_gap_s=longest_gap(sent, t_kill, end),
        first_answer_s=None if first is None else first - t_kill,
        share_first=None if first is None else share(first, first + window_s),
        share_last=share(end - window_s, end),
        replicas=replicas,
        busy_at_kill=busy,
    )


def row(r: FailoverResult) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    return (f"| {r.before} | {r.after} | {r.failed} | {r.retries:.0f} | {r.longest_gap_s:.2f} | "
            f"{f(r.first_answer_s, '.1f')} | {f(r.share_first, '.2f')} | {f(r.share_last, '.2f')} |")


HEADER = ("| answered before the kill | sent after | failed after | retries | longest gap s | "
          "new replica first answer s | new replica share, first window | new replica share, last window |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--embed-adapters", type=int, default=4)
    ap.add_argument("--classify-adapters", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--after", type=float, default=60.0, help="most seconds to measure after the kill")
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="4 users, 3 adapters, 5 s warm-up, 5 s windows")
    ap.add_argument("serve_args", nargs="*", help="more `capaserve serve` flags, after --, e.g. -- --affinity-load-factor 1000")
    args = ap.parse_args(argv)
    if args.quick:
        args.users, args.embed_adapters, args.classify_adapters, args.warmup, args.window = 4, 2, 1, 5.0, 5.0

    work = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    with capaserve_serve(work, "--replicas", "2", "--num-cpus", "1", *args.serve_args) as (url, proc):
        adapters = make_adapters(work, args.embed_adapters, args.classify_adapters)
        for name, body in adapters.items():
            httpx.put(f"{url}/v1/adapters/{name}", content=body, timeout=60).raise_for_status()
        bodies = request_mix(list(adapters))
        for path, body in bodies:  # every adapter loaded somewhere before the clock starts
            httpx.post(f"{url}{path}", json=body, timeout=120).raise_for_status()
        result = run_failover(url, proc.pid, bodies, args.users, args.warmup, args.after, args.window)
    print(HEADER)
    print(row(result))
    print(f"requests per replica over the run: {result.replicas}")
    if result.errors:
        print(f"failures: {result.errors}")
    return 1 if result.failed else 0

if __name__ == "__main__":
    sys.exit(main())
