"""What the plumbing leaves for the forward: the most of the in-process ceiling a server can reach here.

`bench_peer.py` gives capaserve's texts/s as a fraction of the in-process ceiling (the
replica's engine with no server). On a small host the load generator and the server share
the cores with the forward, so that fraction has a bound that no forward can lift: per
request the client spends some CPU, the server's HTTP and Ray plumbing some more, and
what is left of the cores is all the forward gets. This script measures those costs with
the model taken out (`serving/floor.py`: capaserve's request model and response rendering,
a constant vector per input) in three shapes, under the same Locust closed loop as
bench_peer (loadtest/locust_peer.py):

- `fastapi`: one uvicorn process, no Ray: the least a Python server of this shape costs;
- `serve`: that app as a Ray Serve ingress deployment, reached at its own port (direct
  ingress, capaserve's Serve settings);
- `serve-hop`: that ingress calling a second deployment per request (capaserve's two
  deployments, without its coalescing);

then `capaserve serve` itself (defaults) and the in-process ceiling. For each shape and
size it prints requests/s, the server's CPU per request (its process tree), Locust's (the
slope between the 3 s warm-up run and the measured run, so Locust's start is left out), and
the bound

    bound = cores / (ceiling texts/s x ((server + Locust CPU per request) / texts per request
                                        + ceiling CPU per text))

the fraction of the ceiling reached if every core were busy and the forward cost exactly
what it costs in the ceiling (whose batches, 64 texts sorted by length from all 200
sentences, no server sees). A goal above a shape's bound cannot be met in that shape on
this host, whatever the forward does.

    python loadtest/bench_floor.py [--rounds 1] [--duration 10] [--out loadtest/results/floor.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from loadtest.bench_peer import Server, capaserve_server, host_dtype, in_process_ceiling, report, run_locust
from loadtest.run import free_port
from serving.floor import MODES


def floor_server(mode: str) -> Server:
    port = free_port()
    return Server(mode, "floor", url=f"http://127.0.0.1:{port}",
                  cmd=[sys.executable, "-m", "serving.floor", "--mode", mode, "--port", str(port)])


def client_cpu_ms_per_request(short: dict[str, float], long: dict[str, float]) -> float:
    """Locust's CPU per request: the slope between a short and a long run, so that its start
    (a second or more of imports, a tenth of a short run's requests' worth) is left out."""
    extra = long["requests"] - short["requests"]
    return (long["client_cpu_s"] - short["client_cpu_s"]) / extra * 1000 if extra > 0 else float("nan")


def bound(cores: int, ceiling: dict[str, float], run: dict[str, float], texts: int) -> float:
    """The fraction of the ceiling's texts/s left to a forward at the ceiling's CPU per text."""
    per_request_s = (run["server_cpu_ms_per_request"] + run["client_cpu_ms_per_request"]) / 1000
    per_text_s = per_request_s / texts + ceiling["cpu_s_per_1000_texts"] / 1000
    return cores / (ceiling["texts_per_s"] * per_text_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"floor shapes, from {', '.join(MODES)}")
    ap.add_argument("--no-capaserve", action="store_true", help="skip the run of `capaserve serve`")
    ap.add_argument("--texts-per-request", default="1,8")
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per Locust run")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, help="also write the Markdown table (and its .json) here")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        raise SystemExit(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    sizes = [int(x) for x in args.texts_per_request.split(",")]
    cores = psutil.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    dtype = host_dtype()  # what `capaserve serve` picks here

    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    ceilings: list[dict[str, float]] = []
    for rnd in range(args.rounds):
        ceilings.append(in_process_ceiling(dtype, args.duration))
        print(f"# round {rnd + 1}, ceiling: {json.dumps(ceilings[-1])}", file=sys.stderr)
        servers = [floor_server(m) for m in modes]
        if not args.no_capaserve:
            servers.append(capaserve_server(work, []))
        for server in servers if rnd % 2 == 0 else servers[::-1]:
            server.start(work)
            try:
                for n in sizes:
                    warm = run_locust(server, argparse.Namespace(users=args.users, duration=3.0), n, work)
                    res = run_locust(server, args, n, work)
                    res["client_cpu_ms_per_request"] = client_cpu_ms_per_request(warm, res)
                    res["server_cpu_ms_per_request"] = res["cpu_s_per_1000_texts"] * n
                    res["requests_per_s"] = res["texts_per_s"] / n
                    # capaserve's server CPU includes its forwards: a bound from it would count them twice
                    res["bound"] = bound(cores, ceilings[-1], res, n) if server.name in MODES else float("nan")
                    results.setdefault((server.name, n), []).append(res)
                    print(f"# round {rnd + 1}, {server.name}, {n} text(s)/request: {json.dumps(res)}", file=sys.stderr)
            finally:
                server.stop()

    def med(name: str, n: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, n)])

    ceiling_tps = statistics.median(c["texts_per_s"] for c in ceilings)
    ceiling_cpu = statistics.median(c["cpu_s_per_1000_texts"] for c in ceilings)
    names = [*modes, *([] if args.no_capaserve else ["capaserve"])]
    lines = [
        f"{time.strftime('%Y-%m-%d')}, {cores} cores, {args.rounds} round(s), {args.users} users, "
        f"{args.duration:g} s per run, medians; in-process ceiling ({ceilings[0]['dtype']}): {ceiling_tps:.0f} texts/s "
        f"at {ceiling_cpu:.2f} CPU-ms per text",
        "",
        "| server | texts/request | requests/s | server CPU-ms per request | Locust CPU-ms per request "
        "| bound: most of the ceiling left to the forward | reached (texts/s / ceiling) | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        for name in names:
            fails = sum(int(r["failures"]) for r in results[(name, n)])
            # a floor's bound; capaserve's share of the ceiling (a floor computes nothing to compare)
            most = f"{med(name, n, 'bound'):.2f}" if name in MODES else ""
            reached = "" if name in MODES else "{:.2f}".format(statistics.median(
                r["texts_per_s"] / c["texts_per_s"] for r, c in zip(results[(name, n)], ceilings, strict=True)
            ))
            lines.append(
                f"| {name} | {n} | {med(name, n, 'requests_per_s'):.0f} | {med(name, n, 'server_cpu_ms_per_request'):.2f} "
                f"| {med(name, n, 'client_cpu_ms_per_request'):.2f} | {most} "
                f"| {reached} | {fails} |"
            )
    return report(lines, results, args.out, ceilings=ceilings)


if __name__ == "__main__":
    sys.exit(main())
