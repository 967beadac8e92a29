"""Merged-only vs adaptive (merged + mixed-adapter batches): throughput and p99, in process.

Drives the real replica code path (ModelServer -> Scheduler -> Engine, no HTTP, no Ray) on
the MiniLM base with N random CapaBoost adapters (query+value of every layer, r=8, d=2)
under a closed loop of `--clients` concurrent clients, each sending one-text embedding
requests whose adapter is drawn Zipf(s) over the N adapters. Fairness: both modes get the
SAME request sequence (one seed per cell), run on the same engine and adapters, and the
two modes alternate which goes first in each repetition. Throughput is the median over
repetitions of requests / wall time; p99 pools every repetition's latencies.

    python loadtest/bench_mixed.py [--quick] [--out loadtest/results/mixed.md] [--reps N]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.synthetic import random_bundle
from adapters.tasks.kinds import RequestKind
from serving.config import EngineConfig
from serving.config_sources import config_of
from serving.engine.engine import Engine

MODES = ("merged", "adaptive")
TARGET_SUFFIXES = ("attention.self.query", "attention.self.value")
WORDS = (
    "the quick brown fox jumps over a lazy dog while the band plays on and nobody seems to notice "
    "that the evening light is fading slowly across the quiet hills of the old town"
).split()


@dataclass
class Cell:
    n: int
    s: float
    throughput: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    latencies: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    mixed_batches: dict[str, int] = field(default_factory=lambda: {m: 0 for m in MODES})
    batches: dict[str, int] = field(default_factory=lambda: {m: 0 for m in MODES})

    def rps(self, mode: str) -> float:
        return statistics.median(self.throughput[mode])

    def p99_ms(self, mode: str) -> float:
        lat = sorted(self.latencies[mode])
        return 1000.0 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]


def zipf_requests(n: int, s: float, count: int, seed: int) -> list[tuple[str, str]]:
    """`count` (adapter, text) pairs: adapter rank k drawn with weight 1/k^s, texts 3-24 words."""
    rng = random.Random(seed)
    names = [f"a{k:03d}" for k in range(n)]
    weights = [1.0 / (k + 1) ** s for k in range(n)]
    out = []
    for adapter in rng.choices(names, weights=weights, k=count):
        words = rng.choices(WORDS, k=rng.randint(3, 24))
        out.append((adapter, " ".join(words)))
    return out


def build_engine(n: int, threads: int) -> Engine:
    engine = Engine(EngineConfig(num_threads=threads))
    targets = [t for t in engine.spec.linear_shapes if t.endswith(TARGET_SUFFIXES)]
    for k in range(n):
        engine.load_adapter(f"a{k:03d}", random_bundle(engine.spec, targets, seed=k, std=0.1))
    return engine


async def closed_loop(server, requests: list[tuple[str, str]], clients: int) -> tuple[float, list[float]]:
    """Each client sends its next request as soon as its previous one answered."""
    todo = iter(requests)
    latencies: list[float] = []

    async def client() -> None:
        for adapter, text in todo:
            t0 = time.perf_counter()
            await server.scheduler.submit(RequestKind.EMBED, adapter, [text], lengths=[len(text) // 4 + 2])
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - start, latencies


def run_cell(servers: dict, cell: Cell, requests: list[tuple[str, str]], clients: int, first: str) -> None:
    from serving.scheduler import Scheduler

    order = MODES if first == MODES[0] else MODES[::-1]
    for mode in order:
        server = servers[mode]
        server.scheduler = Scheduler(
            server.runner, server.config.scheduler, device_type=server.engine.device.type,
            unpadded=server.engine.unpadded,
        )

        async def go():
            try:
                return await closed_loop(server, requests, clients)
            finally:
                await server.scheduler.close()

        wall, lat = asyncio.run(go())
        stats = server.scheduler.stats()
        cell.throughput[mode].append(len(requests) / wall)
        cell.latencies[mode].extend(lat)
        cell.mixed_batches[mode] += stats.mixed_batches
        cell.batches[mode] += stats.batches


def table(cells: list[Cell], header: str) -> str:
    lines = [
        header,
        "",
        "| N | Zipf s | merged req/s | adaptive req/s | adaptive / merged | merged p99 ms | adaptive p99 ms "
        "| mixed batches (adaptive) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        m, a = c.rps("merged"), c.rps("adaptive")
        share = c.mixed_batches["adaptive"] / max(1, c.batches["adaptive"])
        lines.append(
            f"| {c.n} | {c.s:g} | {m:.1f} | {a:.1f} | **{a / m:.2f}x** | {c.p99_ms('merged'):.0f} "
            f"| {c.p99_ms('adaptive'):.0f} | {share:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N in {1, 10}, s=1, few requests (smoke test)")
    ap.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    ap.add_argument("--reps", type=int, help="repetitions per cell and mode (default 5, quick 1)")
    ap.add_argument("--requests", type=int, help="requests per run (default 240, quick 24)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine (default 1)")
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 5)
    count = args.requests or (24 if args.quick else 240)
    ns = (1, 10) if args.quick else (1, 10, 100)
    ss = (1.0,) if args.quick else (0.5, 1.0, 1.5)

    from serving.deployments import ModelServer

    t0 = time.perf_counter()
    engine = build_engine(max(ns), args.threads)
    load_s = time.perf_counter() - t0
    registry = tempfile.mkdtemp(prefix="bench-mixed-")
    servers = {
        mode: ModelServer(config_of(registry=registry, adapter_mode=mode, num_cpus=args.threads), engine=engine)
        for mode in MODES
    }
    cells = [Cell(n, s) for n in ns for s in ss]
    for rep in range(reps):
        for i, cell in enumerate(cells):
            requests = zipf_requests(cell.n, cell.s, count, seed=1000 * i + rep)
            run_cell(servers, cell, requests, args.clients, first=MODES[(rep + i) % 2])
    sweep_s = time.perf_counter() - t0 - load_s
    cfg = servers["adaptive"].config.scheduler
    header = (
        f"Mixed-adapter batches: merged-only vs adaptive, in process (ModelServer -> Scheduler -> Engine), "
        f"all-MiniLM-L6-v2, float32, {args.threads} torch thread(s), {torch.get_num_threads()} used. "
        f"Closed loop, {args.clients} clients, {count} one-text embedding requests per run (3-24 words), "
        f"{reps} interleaved repetitions per cell and mode, the same requests for both modes. "
        f"Adapters: r=8, d=2 on query+value of all 6 layers. Scheduler: max_batch_size={cfg.max_batch_size}, "
        f"batch_wait_ms={cfg.batch_wait_ms:g}; policy {cfg.mode_policy.model_dump()}. "
        f"Load of {max(ns)} adapters {load_s:.1f} s, sweep {sweep_s:.0f} s."
    )
    text = table(cells, header)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
