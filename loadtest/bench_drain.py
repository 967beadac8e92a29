"""SIGTERM to `capaserve serve` under steady load: is anything in progress lost, how long is the stop?

Starts `capaserve serve` (a subprocess, on 127.0.0.1, `--drain-timeout-s` as given), runs a
closed loop of `--users` clients sending small and large embeddings requests (the base
and an adapter), sends SIGTERM after `--warmup` seconds and keeps the clients going until
the server has exited. Prints one table row:

- in progress at the signal: requests sent before it and answered after it;
- lost: requests sent before the signal that got no 200 (must be 0);
- after the signal: requests sent later, by outcome: 200 (accepted before the ingress
  started refusing), 503 (refused at once, JSON body), refused connections, and cut
  (a connection closed without an answer: a request the server took and dropped);
- exit s: from the signal to the process's exit (the bound is the drain timeout + 5 s).

It also sends one long request (`--long-texts` texts) half a second before the signal and
says how it ended: 200 when the drain timeout lets it finish; with a shorter
`--drain-timeout` it is cut, and the exit still comes within the timeout + 5 s.

    python loadtest/bench_drain.py [--quick] [--users 8] [--warmup 6] [--drain-timeout 20] [--long-texts 1024]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from adapters.default_model import DEFAULT_MODEL_ID
from loadtest.bench_failover import make_adapters
from loadtest.faults import Sent, SteadyLoad, capaserve_serve, round_robin

SMALL = ["the quick brown fox jumps over the lazy dog", "hello world"]
LARGE = [f"sentence number {i} about serving many adapters from one base model on ray serve" for i in range(128)]


@dataclass
class DrainResult:
    in_progress: int  # sent before the signal, answered after it
    lost: int  # sent before the signal, no 200
    after: Counter  # outcome of the requests sent after the signal
    exit_s: float
    errors: list[str]
    phases: dict[str, tuple[float, float]]  # outcome -> (first, last) start after the signal, s
    long: Sent | None = None  # the long request sent just before the signal, if any


def outcome(s: Sent) -> str:
    if s.status is not None:
        return str(s.status)
    return "refused" if s.error.startswith("ConnectError") else "cut"


def run_drain(url: str, proc: subprocess.Popen, bodies: list[tuple[str, dict]], users: int, warmup_s: float,
              exit_limit_s: float, long_body: dict | None = None) -> DrainResult:
    """Load `url`, SIGTERM `proc` after `warmup_s`, keep loading until it exits (at most `exit_limit_s`).

    `long_body`, an embeddings request that takes seconds, is sent 0.5 s before the signal
    on its own connection (`DrainResult.long` is how it ended)."""
    long: list[Sent] = []

    def send_long() -> None:
        start = time.monotonic()
        try:
            r = httpx.post(f"{url}/v1/embeddings", json=long_body, timeout=exit_limit_s + 30)
            long.append(Sent("/v1/embeddings", start, time.monotonic(), r.status_code, r.text[:300]))
        except httpx.HTTPError as exc:
            long.append(Sent("/v1/embeddings", start, time.monotonic(), None, f"{type(exc).__name__}: {exc}"))

    with SteadyLoad(url, round_robin(bodies), users=users, timeout_s=exit_limit_s + 30) as load:
        time.sleep(warmup_s)
        sender = threading.Thread(target=send_long, daemon=True)
        if long_body is not None:
            sender.start()
            time.sleep(0.5)
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=exit_limit_s + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
        exit_s = time.monotonic() - t_signal
        time.sleep(0.5)  # a few connection attempts on the closed port
        load.stop()
        sent = load.snapshot()
        if long_body is not None:
            sender.join(timeout=30)
    before = [s for s in sent if s.start < t_signal]
    later = [s for s in sent if s.start >= t_signal]
    lost = [s for s in before if not s.ok]
    return DrainResult(
        in_progress=sum(1 for s in before if s.ok and s.end >= t_signal),
        lost=len(lost),
        after=Counter(outcome(s) for s in later),
        exit_s=exit_s,
        errors=sorted({s.error for s in lost + [s for s in later if outcome(s) == "cut"]})[:5],
        phases={o: (min(ts), max(ts)) for o in {outcome(s) for s in later}
                for ts in [[s.start - t_signal for s in later if outcome(s) == o]]},
        long=long[0] if long else None,
    )


HEADER = ("| in progress at the signal | lost | after: 200 | after: 503 | after: refused | after: cut | exit s |\n"
          "|---:|---:|---:|---:|---:|---:|---:|")


def row(r: DrainResult) -> str:
    a = r.after
    return f"| {r.in_progress} | {r.lost} | {a['200']} | {a['503']} | {a['refused']} | {a['cut']} | {r.exit_s:.1f} |"


def drain_bodies(url: str, work: Path) -> list[tuple[str, dict]]:
    """Registers one adapter; small and large embeddings requests on the base and on it."""
    (name, body), = make_adapters(work, embed=1, classify=0).items()
    httpx.put(f"{url}/v1/adapters/{name}", content=body, timeout=60).raise_for_status()
    bodies = [(
        "/v1/embeddings", {"model": model, "input": texts})
        for model in (DEFAULT_MODEL_ID, name) for texts in (SMALL, SMALL, SMALL, LARGE)
    ]
    for path, b in bodies[:1] + bodies[4:5]:
        httpx.post(f"{url}{path}", json=b, timeout=120).raise_for_status()
    return bodies


def long_request(texts: int) -> dict:
    """An embeddings request of `texts` texts on the base: seconds of compute on a CPU."""
    return {"model": DEFAULT_MODEL_ID, "input": [f"{LARGE[i % len(LARGE)]} ({i})" for i in range(texts)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=6.0)
    ap.add_argument("--drain-timeout", type=float, default=20.0)
    ap.add_argument("--long-texts", type=int, default=1024,
                    help="texts of one embeddings request sent 0.5 s before the signal (0: none)")
    ap.add_argument("--quick", action="store_true", help="4 users, 4 s warm-up")
    args = ap.parse_args(argv)
    if args.quick:
        args.users, args.warmup = 4, 4.0
    work = Path(tempfile.mkdtemp(prefix="bench-drain-"))
    with capaserve_serve(work, "--drain-timeout-s", str(args.drain_timeout)) as (url, proc):
        bodies = drain_bodies(url, work)
        long_body = long_request(args.long_texts) if args.long_texts else None
        result = run_drain(url, proc, bodies, args.users, args.warmup, args.drain_timeout + 5, long_body)
    print(HEADER)
    print(row(result))
    if result.long is not None:
        print(f"the long request ({args.long_texts} texts) sent before the signal: {outcome(result.long)} "
              f"after {result.long.end - result.long.start:.1f} s")
    print("after the signal, first and last request of each outcome (s): "
          + ", ".join(f"{o} {a:.2f}-{b:.2f}" for o, (a, b) in sorted(result.phases.items())))
    if result.errors:
        print(f"errors: {result.errors}")
    print(f"server log: {work / 'serve.log'}")
    ok = not result.lost and not result.after["cut"] and result.exit_s <= args.drain_timeout + 5
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
