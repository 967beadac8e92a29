"""Prometheus metrics, served at GET /metrics on the HTTP port, correct with N replicas.

Design: model replicas are separate processes, and Ray's own metrics go to a separate
exporter port, so the ingress owns one prometheus_client registry and records:

* what it sees itself: requests and latency by route / adapter / status, time to first
  token, prompt and generated tokens;
* what replicas report: every model-deployment answer carries a `ReplicaReport` with
  the events of that replica since its previous answer (swap count and latencies, cache
  hits / misses / evictions, batch sizes) plus its current gauges (cache bytes, queue
  depth). The replica clears the events once it hands them over, so each event is
  counted exactly once whichever answer carries it, and counters stay monotonic with
  any number of replicas. Gauges are labelled by replica.

Events of a replica that gets no more traffic wait there until its next answer; that
is the price of not running a separate scrape path into each replica.
Adapter label values are bounded (`MAX_ADAPTER_LABELS`), beyond which they read "other".

Which series carry an adapter label: those the ingress counts per request (requests,
latency, tokens, time to first token, and swapped requests), one label dimension each, so
thousands of adapters make at most MAX_ADAPTER_LABELS + 1 series per route and status. The
replica-side series (swaps, cache hits/misses/evictions/bytes, queue depth, adapter mode)
are labelled by replica only: a replica reports them as totals since its last answer, and
an adapter x replica label would multiply series by the replica count for figures an
operator reads per replica (is it thrashing, is it full). Which adapter causes the swaps
is `capaserve_adapter_swapped_requests_total{adapter}`; which one was loaded is in the
access log (one line per request: adapter, replica, swapped).
"""

from __future__ import annotations

from pydantic import BaseModel, Field
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 - re-exported
from prometheus_client import disable_created_metrics

from adapters.manifest import parse_model_ref

disable_created_metrics()  # the *_created series only double the exposition

MAX_ADAPTER_LABELS = 1000

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SWAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ADAPTER_MODES = ("merged", "mixed")


class ReplicaReport(BaseModel):
    """A replica's metric events since its previous answer, and its gauges now."""

    replica: str = Field(..., description="Replica id, the label of its gauges.")
    swap_seconds: list[float] = Field(default_factory=list, description="Latency of each adapter swap.")
    cache_hits: int = Field(0, description="Adapter cache hits since the previous report.")
    cache_misses: int = Field(0, description="Adapter cache misses (loads) since the previous report.")
    cache_evictions: int = Field(0, description="Adapters evicted since the previous report.")
    batch_sizes: list[int] = Field(default_factory=list, description="Requests per batch run.")
    cache_bytes: int = Field(0, description="Bytes of adapter data held now.")
    queue_depth: int = Field(0, description="Requests queued now.")
    loaded_adapters: int = Field(0, description="Adapters loaded now.")
    adapter_mode: str = Field("merged", description="The replica's adapter mode now: merged or mixed.")
    mode_switches: int = Field(0, description="Merged/mixed mode switches since the previous report.")
    running_sequences: int = Field(0, description="Generation sequences in the replica's continuous batch now.")
    sequences_cancelled: int = Field(0, description="Sequences dropped because their client left, since the previous report.")


class ServerMetrics:
    """Every capaserve metric, declared once, on its own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._adapters: set[str] = set()
        by_req = ("route", "adapter", "status")
        self.requests = Counter(
            "capaserve_requests_total", "HTTP requests answered, by route, adapter and status code.", by_req, registry=r
        )
        self.request_latency = Histogram(
            "capaserve_request_latency_seconds",
            "Time from request arrival to the last byte of the answer.",
            by_req,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "capaserve_time_to_first_token_seconds",
            "Time from request arrival to the first generated text of a streamed answer.",
            ("route", "adapter"),
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "capaserve_prompt_tokens_total", "Input tokens processed, by route and adapter.", ("route", "adapter"), registry=r
        )
        self.generated_tokens = Counter(
            "capaserve_generated_tokens_total", "Tokens generated, by route and adapter.", ("route", "adapter"), registry=r
        )
        self.swaps = Counter(
            "capaserve_adapter_swaps_total", "Times a replica rewrote its weights for another adapter.", ("replica",), registry=r
        )
        self.swapped_requests = Counter(
            "capaserve_adapter_swapped_requests_total",
            "Requests whose batch began with a swap to their adapter, by adapter name: which adapters "
            "pay for swaps (compare capaserve_requests_total of the same adapter).",
            ("adapter",),
            registry=r,
        )
        self.swap_latency = Histogram(
            "capaserve_adapter_swap_latency_seconds", "Time one adapter swap took.", buckets=SWAP_BUCKETS, registry=r
        )
        self.cache_hits = Counter(
            "capaserve_adapter_cache_hits_total", "Requests whose adapter was already loaded.", ("replica",), registry=r
        )
        self.cache_misses = Counter(
            "capaserve_adapter_cache_misses_total", "Adapter loads (the adapter was not loaded).", ("replica",), registry=r
        )
        self.cache_evictions = Counter(
            "capaserve_adapter_cache_evictions_total", "Adapters dropped to stay within budget.", ("replica",), registry=r
        )
        self.cache_bytes = Gauge(
            "capaserve_adapter_cache_bytes", "Bytes of adapter data a replica holds.", ("replica",), registry=r
        )
        self.loaded_adapters = Gauge(
            "capaserve_loaded_adapters", "Adapters loaded on a replica.", ("replica",), registry=r
        )
        self.queue_depth = Gauge(
            "capaserve_queue_depth_requests", "Requests waiting in a replica's scheduler.", ("replica",), registry=r
        )
        self.running_sequences = Gauge(
            "capaserve_running_sequences",
            "Generation sequences in a replica's continuous batch (decoding or being prefilled).",
            ("replica",),
            registry=r,
        )
        self.sequences_cancelled = Counter(
            "capaserve_sequences_cancelled_total",
            "Generation sequences a replica dropped because their client went away (freed before the next step).",
            ("replica",),
            registry=r,
        )
        self.batch_size = Histogram(
            "capaserve_batch_size_requests", "Requests per batch a replica ran.", buckets=BATCH_BUCKETS, registry=r
        )

        self.adapter_mode = Gauge(
            "capaserve_adapter_mode",
            "1 for a replica's current adapter mode (merged: one adapter in the weights; mixed: "
            "unmerged per-row adapters), 0 for the other.",
            ("replica", "mode"),
            registry=r,
        )
        self.replica_requests = Counter(
            "capaserve_replica_requests_total",
            "Requests answered by each model replica (how the router spreads the load).",
            ("replica",),
            registry=r,
        )
        self.replica_retries = Counter(
            "capaserve_replica_retries_total",
            "Replica calls sent once more because their replica was lost while they ran (idempotent methods only).",
            ("method",),
            registry=r,
        )
        self.mode_switches = Counter(
            "capaserve_adapter_mode_switches_total",
            "Times a replica's scheduler switched between merged and mixed-adapter batches.",
            ("replica",),
            registry=r,
        )

    def adapter_label(self, target: str | None) -> str:
        """The adapter's name (not version), "base" or "unknown" as a label value; bounded in number."""
        if target is None:
            return "none"
        name = parse_model_ref(target)[0]
        if name in self._adapters or len(self._adapters) < MAX_ADAPTER_LABELS:
            self._adapters.add(name)
            return name
        return "other"

    def observe_request(self, route: str, adapter: str, status: int, seconds: float) -> None:
        self.requests.labels(route, adapter, str(status)).inc()
        self.request_latency.labels(route, adapter, str(status)).observe(seconds)

    def observe_tokens(self, route: str, adapter: str, prompt: int, generated: int = 0) -> None:
        if prompt:
            self.prompt_tokens.labels(route, adapter).inc(prompt)
        if generated:
            self.generated_tokens.labels(route, adapter).inc(generated)

    def apply(self, report: ReplicaReport | None) -> None:
        """Fold one replica's report in (each event arrives in exactly one report)."""
        if report is None:
            return
        rep = report.replica
        if report.swap_seconds:
            self.swaps.labels(rep).inc(len(report.swap_seconds))
            for s in report.swap_seconds:
                self.swap_latency.observe(s)
        else:
            self.swaps.labels(rep).inc(0)
        self.cache_hits.labels(rep).inc(report.cache_hits)
        self.cache_misses.labels(rep).inc(report.cache_misses)
        self.cache_evictions.labels(rep).inc(report.cache_evictions)
        for b in report.batch_sizes:
            self.batch_size.observe(b)
        self.cache_bytes.labels(rep).set(report.cache_bytes)
        self.queue_depth.labels(rep).set(report.queue_depth)
        self.loaded_adapters.labels(rep).set(report.loaded_adapters)
        for mode in ADAPTER_MODES:
            self.adapter_mode.labels(rep, mode).set(1.0 if report.adapter_mode == mode else 0.0)
        self.mode_switches.labels(rep).inc(report.mode_switches)
        self.running_sequences.labels(rep).set(report.running_sequences)
        self.sequences_cancelled.labels(rep).inc(report.sequences_cancelled)

    def render(self) -> bytes:
        return generate_latest(self.registry)
