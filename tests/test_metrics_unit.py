"""serving.metrics without Ray: what each ServerMetrics call and each ReplicaReport does to
the exported Prometheus text, read back with prometheus_client's own text parser and
compared with values computed here (counts, sums, cumulative `le` buckets)."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from serving import metrics as metrics_module
from serving.metrics import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    SWAP_BUCKETS,
    ReplicaReport,
    ServerMetrics,
)

Key = tuple[str, tuple[tuple[str, str], ...]]

FAMILIES = {
    "capaserve_requests": "counter",
    "capaserve_request_latency_seconds": "histogram",
    "capaserve_time_to_first_token_seconds": "histogram",
    "capaserve_prompt_tokens": "counter",
    "capaserve_generated_tokens": "counter",
    "capaserve_adapter_swaps": "counter",
    "capaserve_adapter_swapped_requests": "counter",
    "capaserve_adapter_swap_latency_seconds": "histogram",
    "capaserve_adapter_cache_hits": "counter",
    "capaserve_adapter_cache_misses": "counter",
    "capaserve_adapter_cache_evictions": "counter",
    "capaserve_adapter_cache_bytes": "gauge",
    "capaserve_loaded_adapters": "gauge",
    "capaserve_queue_depth_requests": "gauge",
    "capaserve_batch_size_requests": "histogram",
    "capaserve_adapter_mode": "gauge",
    "capaserve_adapter_mode_switches": "counter",
    "capaserve_replica_requests": "counter",
    "capaserve_replica_retries": "counter",
    "capaserve_running_sequences": "gauge",
    "capaserve_sequences_cancelled": "counter",
}
REPLICA_SERIES = (
    "capaserve_adapter_swaps_total",
    "capaserve_adapter_cache_hits_total",
    "capaserve_adapter_cache_misses_total",
    "capaserve_adapter_cache_evictions_total",
    "capaserve_adapter_cache_bytes",
    "capaserve_loaded_adapters",
    "capaserve_queue_depth_requests",
    "capaserve_adapter_mode_switches_total",
    "capaserve_running_sequences",
    "capaserve_sequences_cancelled_total",
)


def samples(m: ServerMetrics) -> dict[Key, float]:
    """Every exported sample, parsed from the rendered text: (name, sorted labels) -> value."""
    out: dict[Key, float] = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, key
            out[key] = s.value
    return out


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


def fmt_le(bound: float) -> str:
    """The `le` label prometheus_client writes for a bucket bound (Go float format)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def expected_histogram(name: str, bounds: tuple[float, ...], values: list[float], **labels: str) -> dict[Key, float]:
    """Cumulative `le` buckets, count and sum of `values`, computed by counting here."""
    out = {key(f"{name}_bucket", le=fmt_le(b), **labels): float(sum(v <= b for v in values)) for b in (*bounds, math.inf)}
    out[key(f"{name}_count", **labels)] = float(len(values))
    out[key(f"{name}_sum", **labels)] = float(sum(values))
    return out


def only(all_samples: dict[Key, float], prefix: str) -> dict[Key, float]:
    return {k: v for k, v in all_samples.items() if k[0].startswith(prefix)}


def test_fresh_registry_declares_every_family_and_exports_only_unlabelled_histograms() -> None:
    """A new ServerMetrics exports HELP/TYPE for all 19 families, no *_created series, no
    labelled series (none observed yet) and the two unlabelled histograms at zero."""
    m = ServerMetrics()
    fams = {f.name: f.type for f in text_string_to_metric_families(m.render().decode())}
    assert fams == FAMILIES
    text = m.render().decode()
    assert "_created" not in text
    want = expected_histogram("capaserve_adapter_swap_latency_seconds", SWAP_BUCKETS, [])
    want |= expected_histogram("capaserve_batch_size_requests", tuple(map(float, BATCH_BUCKETS)), [])
    assert samples(m) == want


def test_observe_request_counts_by_route_adapter_status_and_buckets_latency() -> None:
    """Each observe_request adds 1 to its (route, adapter, status) series, with the integer
    status written as a string, and one latency observation to the same labels; a bound
    equal to an observation counts it (le is inclusive)."""
    m = ServerMetrics()
    calls = [("/v1/embeddings", "base", 200, 0.003), ("/v1/embeddings", "base", 200, 0.01),
             ("/v1/embeddings", "fe-a", 200, 0.2), ("/v1/classify", "unknown", 404, 75.0),
             ("/v1/embeddings", "base", 200, 1.5)]
    for c in calls:
        m.observe_request(*c)
    got = samples(m)
    want: dict[Key, float] = {}
    groups: dict[tuple[str, str, str], list[float]] = {}
    for route, adapter, status, s in calls:
        groups.setdefault((route, adapter, str(status)), []).append(s)
    for (route, adapter, status), secs in groups.items():
        labels = {"route": route, "adapter": adapter, "status": status}
        want[key("capaserve_requests_total", **labels)] = float(len(secs))
        want |= expected_histogram("capaserve_request_latency_seconds", LATENCY_BUCKETS, secs, **labels)
    assert only(got, "capaserve_request") == want
    base_200 = {"route": "/v1/embeddings", "adapter": "base", "status": "200"}
    assert got[key("capaserve_requests_total", **base_200)] == 3.0
    assert got[key("capaserve_request_latency_seconds_bucket", le="0.01", **base_200)] == 2.0  # 0.003 and 0.01
    assert got[key("capaserve_request_latency_seconds_bucket", le="60.0", route="/v1/classify", adapter="unknown",
                   status="404")] == 0.0  # 75 s is only in +Inf
    assert only(got, "capaserve_prompt_tokens") == only(got, "capaserve_time_to_first_token") == {}


def test_observe_tokens_adds_prompt_and_generated_and_skips_zero() -> None:
    """observe_tokens adds the given counts per (route, adapter); a zero count creates no series."""
    m = ServerMetrics()
    m.observe_tokens("/v1/embeddings", "base", 7)
    m.observe_tokens("/v1/embeddings", "base", 5, 0)
    m.observe_tokens("/v1/completions", "lm-a", 3, 11)
    m.observe_tokens("/v1/completions", "lm-a", 0, 4)
    m.observe_tokens("/v1/classify", "cls-a", 0, 0)
    got = samples(m)
    assert only(got, "capaserve_prompt_tokens") == {
        key("capaserve_prompt_tokens_total", route="/v1/embeddings", adapter="base"): 12.0,
        key("capaserve_prompt_tokens_total", route="/v1/completions", adapter="lm-a"): 3.0,
    }
    assert only(got, "capaserve_generated_tokens") == {
        key("capaserve_generated_tokens_total", route="/v1/completions", adapter="lm-a"): 15.0,
    }


def test_adapter_label_strips_the_version_and_bounds_distinct_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """name@version -> name; None -> "none"; once MAX_ADAPTER_LABELS names are known, a new
    name reads "other" while known names (any version) keep their own label."""
    monkeypatch.setattr(metrics_module, "MAX_ADAPTER_LABELS", 3)
    m = ServerMetrics()
    assert m.adapter_label(None) == "none"
    assert [m.adapter_label(t) for t in ("base", "fe-a@2", "fe-a", "fe-a@10", "cls-b@1")] == [
        "base", "fe-a", "fe-a", "fe-a", "cls-b"]
    assert [m.adapter_label(t) for t in ("new-one", "new-two@1", "fe-a@3", "base", "cls-b")] == [
        "other", "other", "fe-a", "base", "cls-b"]
    assert m.adapter_label(None) == "none"  # "none" takes no slot


def test_apply_none_changes_nothing() -> None:
    """An answer without a report (an error, a stream's middle item) leaves the text as it was."""
    m = ServerMetrics()
    m.apply(ReplicaReport(replica="r1", swap_seconds=[0.002], cache_hits=1, batch_sizes=[2]))
    before = m.render()
    m.apply(None)
    assert m.render() == before


def test_apply_folds_events_per_replica_and_sets_gauges() -> None:
    """Counters add each report's events under its replica label; the swap-latency and
    batch-size histograms hold every replica's observations together; gauges take the
    latest report's value per replica (also when it goes down); the mode gauge is one-hot."""
    m = ServerMetrics()
    reports = [
        ReplicaReport(replica="r1", swap_seconds=[0.0004, 0.003, 0.03], cache_hits=4, cache_misses=2,
                      cache_evictions=1, batch_sizes=[1, 3, 8], cache_bytes=4096, queue_depth=5,
                      loaded_adapters=2, adapter_mode="merged", mode_switches=0, running_sequences=7,
                      sequences_cancelled=2),
        ReplicaReport(replica="r2", swap_seconds=[], cache_hits=0, cache_misses=1, batch_sizes=[200],
                      cache_bytes=100, queue_depth=1, loaded_adapters=1, adapter_mode="mixed", mode_switches=1),
        ReplicaReport(replica="r1", swap_seconds=[0.5, 2.0], cache_hits=3, batch_sizes=[2, 2], cache_bytes=1024,
                      queue_depth=0, loaded_adapters=1, adapter_mode="mixed", mode_switches=2, sequences_cancelled=1),
    ]
    for r in reports:
        m.apply(r)
    got = samples(m)

    want: dict[Key, float] = {}
    for rep in ("r1", "r2"):
        mine = [r for r in reports if r.replica == rep]
        last = mine[-1]
        want |= {
            key("capaserve_adapter_swaps_total", replica=rep): float(sum(len(r.swap_seconds) for r in mine)),
            key("capaserve_adapter_cache_hits_total", replica=rep): float(sum(r.cache_hits for r in mine)),
            key("capaserve_adapter_cache_misses_total", replica=rep): float(sum(r.cache_misses for r in mine)),
            key("capaserve_adapter_cache_evictions_total", replica=rep): float(sum(r.cache_evictions for r in mine)),
            key("capaserve_adapter_mode_switches_total", replica=rep): float(sum(r.mode_switches for r in mine)),
            key("capaserve_sequences_cancelled_total", replica=rep): float(sum(r.sequences_cancelled for r in mine)),
            key("capaserve_running_sequences", replica=rep): float(last.running_sequences),
            key("capaserve_adapter_cache_bytes", replica=rep): float(last.cache_bytes),
            key("capaserve_queue_depth_requests", replica=rep): float(last.queue_depth),
            key("capaserve_loaded_adapters", replica=rep): float(last.loaded_adapters),
            key("capaserve_adapter_mode", replica=rep, mode="merged"): float(last.adapter_mode == "merged"),
            key("capaserve_adapter_mode", replica=rep, mode="mixed"): float(last.adapter_mode == "mixed"),
        }
    swaps = [s for r in reports for s in r.swap_seconds]
    batches = [float(b) for r in reports for b in r.batch_sizes]
    want |= expected_histogram("capaserve_adapter_swap_latency_seconds", SWAP_BUCKETS, swaps)
    want |= expected_histogram("capaserve_batch_size_requests", tuple(map(float, BATCH_BUCKETS)), batches)
    assert {k: v for k, v in got.items() if not k[0].startswith(("capaserve_request", "capaserve_prompt"))} == want

    # the same figures, spelled out
    assert got[key("capaserve_adapter_swaps_total", replica="r1")] == 5.0
    assert got[key("capaserve_adapter_swaps_total", replica="r2")] == 0.0  # present, at 0, with no swaps
    assert got[key("capaserve_adapter_cache_bytes", replica="r1")] == 1024.0  # went down from 4096
    assert got[key("capaserve_adapter_mode", replica="r1", mode="mixed")] == 1.0
    assert got[key("capaserve_adapter_mode", replica="r1", mode="merged")] == 0.0
    assert got[key("capaserve_sequences_cancelled_total", replica="r1")] == 3.0
    assert got[key("capaserve_running_sequences", replica="r1")] == 0.0  # went down from 7
    assert got[key("capaserve_batch_size_requests_bucket", le="2.0")] == 3.0  # 1, 2, 2
    assert got[key("capaserve_batch_size_requests_bucket", le="128.0")] == 5.0  # all six but 200
    assert got[key("capaserve_batch_size_requests_sum")] == 216.0
    assert got[key("capaserve_adapter_swap_latency_seconds_bucket", le="0.0005")] == 1.0
    assert got[key("capaserve_adapter_swap_latency_seconds_bucket", le="1.0")] == 4.0  # 2.0 s only in +Inf


def test_first_report_of_a_replica_creates_all_its_series_at_its_values() -> None:
    """One default report makes every per-replica series appear (counters at 0, merged mode),
    so a dashboard sees a replica before it has any events."""
    m = ServerMetrics()
    m.apply(ReplicaReport(replica="replica-7"))
    got = samples(m)
    per_replica = {k: v for k, v in got.items() if ("replica", "replica-7") in k[1]}
    assert {k[0] for k in per_replica} == set(REPLICA_SERIES) | {"capaserve_adapter_mode"}
    assert per_replica.pop(key("capaserve_adapter_mode", replica="replica-7", mode="merged")) == 1.0
    assert set(per_replica.values()) == {0.0}
    assert got[key("capaserve_batch_size_requests_count")] == got[key("capaserve_adapter_swap_latency_seconds_count")] == 0.0


def test_replica_report_defaults_round_trip_and_types() -> None:
    """The report crosses the Ray boundary as data: defaults are empty / zero / merged, a JSON
    round trip gives the equal report, and a non-integer count is refused."""
    r = ReplicaReport(replica="x")
    assert r.model_dump() == {
        "replica": "x", "swap_seconds": [], "cache_hits": 0, "cache_misses": 0, "cache_evictions": 0,
        "batch_sizes": [], "cache_bytes": 0, "queue_depth": 0, "loaded_adapters": 0, "adapter_mode": "merged",
        "mode_switches": 0, "running_sequences": 0, "sequences_cancelled": 0,
    }
    full = ReplicaReport(replica="y", swap_seconds=[0.25], cache_hits=3, batch_sizes=[4, 1], cache_bytes=10,
                         adapter_mode="mixed", mode_switches=1)
    assert ReplicaReport.model_validate_json(full.model_dump_json()) == full
    with pytest.raises(ValidationError):
        ReplicaReport(replica="z", cache_hits="many")
    with pytest.raises(ValidationError):
        ReplicaReport()  # the replica id is required: it labels the gauges
