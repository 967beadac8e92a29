"""The load-test report: results.json, a Markdown summary with the goals checked, PNG plots.

Per configuration, numbers are medians over rounds (failures and contamination are
summed: one is one too many). The goals compare three configurations of the same run:
the grouped scheduler at N = goal adapters and Zipf s = goal s, the same app with a
single adapter (N = 1), and the swap-per-request baseline at the goal's N and s.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

GOAL_VS_SINGLE = 0.8
GOAL_VS_BASELINE = 2.0


class RunInfo(BaseModel):
    """What was run, on what machine, in what conditions."""

    model: str
    task: str
    targets: str
    n_targets: int
    bundle_kib: float
    cpu_count: int
    load_before: list[float] = Field(description="1/5/15-minute load averages before the run.")
    load_after: list[float]
    started: float
    wall_s: float
    config: dict[str, Any]
    notes: list[str] = Field(default_factory=list)


class Row(BaseModel):
    """One configuration, aggregated over its rounds."""

    label: str
    app: str
    adapters: int
    zipf: float
    rounds: int
    requests: int
    failures: int
    contaminated: int
    checked: int
    rps: float
    p50_ms: float
    p99_ms: float
    swaps_per_s: float
    mean_batch: float | None
    adapter_loads: float
    samples: list[str] = Field(default_factory=list)


def aggregate(results: list[Any]) -> list[Row]:
    groups: dict[Any, list[Any]] = defaultdict(list)
    for r in results:
        groups[r.case].append(r)
    rows = []
    for case, rs in groups.items():
        batches = [r.mean_batch for r in rs if r.mean_batch is not None]
        rows.append(Row(
            label=case.label, app=case.app, adapters=case.adapters, zipf=case.zipf, rounds=len(rs),
            requests=sum(r.requests for r in rs), failures=sum(r.failures for r in rs),
            contaminated=sum(r.contaminated for r in rs), checked=sum(r.checked for r in rs),
            rps=statistics.median(r.rps for r in rs), p50_ms=statistics.median(r.p50_ms for r in rs),
            p99_ms=statistics.median(r.p99_ms for r in rs), swaps_per_s=statistics.median(r.swaps_per_s for r in rs),
            mean_batch=statistics.median(batches) if batches else None,
            adapter_loads=sum(r.adapter_loads for r in rs), samples=[s for r in rs for s in r.samples][:5],
        ))
    rows.sort(key=lambda r: (r.app != "grouped", r.adapters, r.zipf))
    return rows


def _find(rows: list[Row], app: str, n: int, s: float) -> Row | None:
    for r in rows:
        if r.app == app and r.adapters == n and (n == 1 or abs(r.zipf - s) < 1e-9):
            return r
    return None


def _ratio_goal(grouped: Row, other: Row | None, goal: float, what: str, missing: str) -> tuple[str, bool]:
    """One throughput-ratio goal as a Markdown line, and whether it was met (False if unmeasured)."""
    if other is None or other.rps <= 0:
        return f"- {missing}", False
    ratio = grouped.rps / other.rps
    met = ratio >= goal
    return (f"- {what}: {grouped.rps:.1f} / {other.rps:.1f} req/s "
            f"= **{ratio:.2f}x** (goal >= {goal}x): {'met' if met else 'NOT met'}"), met


def goals(rows: list[Row], n: int, s: float) -> tuple[list[str], bool]:
    """Markdown lines for each goal, and whether all were met."""
    lines: list[str] = []
    ok = True
    grouped, single, base = _find(rows, "grouped", n, s), _find(rows, "grouped", 1, s), _find(rows, "baseline", n, s)
    if grouped is None:
        return [f"- no grouped run at N={n}, s={s:g}: goals not evaluated"], False
    for line, met in (
        _ratio_goal(grouped, single, GOAL_VS_SINGLE, f"throughput at N={n}, s={s:g} vs single adapter",
                    "no single-adapter run: throughput vs single adapter not evaluated"),
        _ratio_goal(grouped, base, GOAL_VS_BASELINE, "throughput vs swap-per-request baseline",
                    "no baseline run: throughput vs swap-per-request not evaluated"),
    ):
        lines.append(line)
        ok &= met
    failed = sum(r.failures - r.contaminated for r in rows)
    dirty = sum(r.contaminated for r in rows)
    checked = sum(r.checked for r in rows)
    total = sum(r.requests for r in rows)
    met = failed == 0 and dirty == 0
    ok &= met
    lines.append(f"- failed requests: **{failed}**, contaminated: **{dirty}** of {checked} compared "
                 f"({total} requests in all configurations): {'met' if met else 'NOT met'}")
    lines.append(f"- p99 latency at N={n}, s={s:g}: **{grouped.p99_ms:.0f} ms** grouped "
                 f"(p50 {grouped.p50_ms:.0f} ms)"
                 + (f", {single.p99_ms:.0f} ms single adapter" if single else "")
                 + (f", {base.p99_ms:.0f} ms baseline" if base else ""))
    return lines, ok


def table(rows: list[Row]) -> list[str]:
    out = [
        "| configuration | req/s | p50 ms | p99 ms | swaps/s | mean batch | requests | failed | contaminated / compared |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        batch = f"{r.mean_batch:.2f}" if r.mean_batch is not None else "-"
        out.append(f"| {r.label} | {r.rps:.1f} | {r.p50_ms:.0f} | {r.p99_ms:.0f} | {r.swaps_per_s:.1f} | {batch} | "
                   f"{r.requests} | {r.failures - r.contaminated} | {r.contaminated} / {r.checked} |")
    return out


def plots(out: Path, rows: list[Row], goal_zipf: float) -> list[str]:
    """throughput.png, latency.png, swaps.png (matplotlib Agg); returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = [r for r in rows if r.app == "grouped"]
    base = sorted((r for r in rows if r.app == "baseline"), key=lambda r: r.adapters)
    single = _find(rows, "grouped", 1, goal_zipf)
    zipfs = sorted({r.zipf for r in grouped if r.adapters > 1})
    ns = sorted({r.adapters for r in grouped})

    def series(s: float) -> list[Row]:
        return sorted((r for r in grouped if r.adapters == 1 or abs(r.zipf - s) < 1e-9), key=lambda r: r.adapters)

    files = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for s in zipfs:
        rs = series(s)
        ax1.plot([r.adapters for r in rs], [r.rps for r in rs], marker="o", label=f"grouped, Zipf s={s:g}")
    if base:
        ax1.plot([r.adapters for r in base], [r.rps for r in base], marker="s", ls="--", color="k",
                 label=f"swap per request, s={goal_zipf:g}")
    if single:
        ax1.axhline(GOAL_VS_SINGLE * single.rps, color="grey", ls=":", label=f"{GOAL_VS_SINGLE} x single adapter")
    ax1.set_xscale("log")
    ax1.set_xlabel("adapters N")
    ax1.set_ylabel("throughput (req/s)")
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    ax1.set_title("throughput vs adapters")
    for n in ns:
        if n == 1:
            continue
        rs = sorted((r for r in grouped if r.adapters == n), key=lambda r: r.zipf)
        ax2.plot([r.zipf for r in rs], [r.rps for r in rs], marker="o", label=f"grouped, N={n}")
    if single:
        ax2.axhline(single.rps, color="grey", ls=":", label="single adapter")
    ax2.set_xlabel("Zipf exponent s (higher: more skewed)")
    ax2.set_ylabel("throughput (req/s)")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    ax2.set_title("throughput vs popularity skew")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=80)
    plt.close(fig)
    files.append("throughput.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    rs = series(goal_zipf)
    for key, style in (("p50_ms", "-"), ("p99_ms", "--")):
        ax.plot([r.adapters for r in rs], [getattr(r, key) for r in rs], marker="o", ls=style,
                label=f"grouped {key[:3]}, s={goal_zipf:g}")
        if base:
            ax.plot([r.adapters for r in base], [getattr(r, key) for r in base], marker="s", ls=style, color="k",
                    label=f"swap per request {key[:3]}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("adapters N")
    ax.set_ylabel("latency (ms)")
    ax.legend(fontsize=8)
    ax.set_title("p50 / p99 latency vs adapters")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=80)
    plt.close(fig)
    files.append("latency.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([r.label for r in rows][::-1], [r.swaps_per_s for r in rows][::-1],
            color=["k" if r.app == "baseline" else "C0" for r in rows][::-1])
    ax.set_xlabel("adapter swaps per second (/metrics, after - before)")
    ax.set_title("weight rewrites")
    fig.tight_layout()
    fig.savefig(out / "swaps.png", dpi=80)
    plt.close(fig)
    files.append("swaps.png")
    return files


def _ingress_words(c: dict) -> str:
    if c.get("url"):
        return "requests to the given URL(s)"
    if c.get("ingress", "proxy") == "direct":
        return "requests straight to each app's ingress replica (Serve direct ingress, no proxy hop)"
    return "requests through Serve's HTTP proxy"


def write(out: Path, info: RunInfo, results: list[Any], *, goal_adapters: int, goal_zipf: float) -> Path:
    """Write results.json, summary.md and the plots into `out`; returns summary.md."""
    rows = aggregate(results)
    (out / "results.json").write_text(json.dumps({
        "info": info.model_dump(), "rows": [r.model_dump() for r in rows],
        "runs": [json.loads(r.model_dump_json()) for r in results],
    }, indent=1))
    files = plots(out, rows, goal_zipf)
    goal_lines, ok = goals(rows, goal_adapters, goal_zipf)
    c = info.config
    md = [
        "# capaserve load test",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(info.started))}, {info.wall_s / 60:.1f} min wall. "
        f"Base `{info.model}` ({info.task}); synthetic CapaBoost adapters on {info.n_targets} `{info.targets}` "
        f"Linear layers, r={c['rank']}, d={c['num_copies']} ({info.bundle_kib:.0f} KiB per bundle). "
        f"{c['users']} closed-loop Locust users, {c['duration_s']:g} s per configuration x {c['rounds']} round(s); "
        f"mix `{c['mix']}`, {c['texts_per_request']} text(s) per request, {c['check_fraction']:.0%} of answers "
        f"compared with single-request references. Server: {c['replicas']} model replica(s) x {c['num_cpus']:g} CPU, "
        f"max batch {c['max_batch_size']}, batch wait {c['batch_wait_ms']:g} ms, {c.get('dtype', 'float32')} weights, "
        f"{_ingress_words(c)}. Machine: {info.cpu_count} cores, "
        f"load average {info.load_before[0]:.1f} before, {info.load_after[0]:.1f} after (Locust and the server "
        "share these cores).",
        "",
        "## Goals",
        "",
        *goal_lines,
        "",
        f"All goals met: **{'yes' if ok else 'no'}**.",
        "",
        "## All configurations",
        "",
        "`grouped` is the scheduler as built (grouping by adapter on); `baseline` is the same server with "
        "`grouping=False` (every request alone, swapping whenever the adapter changes). N=1 is the single-adapter "
        "run. Latencies are Locust's (client side); swaps/s and mean batch come from the server's /metrics.",
        "",
        *table(rows),
        "",
        *(f"![{f}]({f})" for f in files),
        "",
    ]
    if info.notes:
        md += ["## Notes", "", *(f"- {n}" for n in info.notes), ""]
    samples = [s for r in rows for s in r.samples]
    if samples:
        md += ["## First failure messages", "", *(f"- `{s[:300]}`" for s in samples[:10]), ""]
    path = out / "summary.md"
    path.write_text("\n".join(md))
    return path
