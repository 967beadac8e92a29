"""What a model replica tells the ingress about itself on every answer.

The ingress owns the Prometheus registry (serving/metrics.py); a replica's events (swaps
and their latency, cache hits, misses and evictions, batch sizes, mode switches) ride back
on its answers as a `ReplicaReport`, each event in exactly one report, so metrics count
them once however answers interleave. Gauges (cache bytes, loaded adapters, queue depth,
mode) are the values at report time.
"""

from __future__ import annotations

from serving.engine.outputs import EngineStats
from serving.metrics import ReplicaReport
from serving.replica_io import ServedBy
from serving.scheduler import BatchInfo, SchedulerStats


class ReplicaReporter:
    """Engine and scheduler counters in, one `ReplicaReport` per answer out.

    `observe` runs on an engine worker after each engine call and on the loader thread
    after each adapter load or unload; `report` runs on the replica's event loop.
    """

    def __init__(self, replica: str, stats: EngineStats) -> None:
        self.replica = replica
        self._stats = stats
        self._reported = stats
        self._swap_events: list[float] = []
        self._reported_mode_switches = 0
        self._reported_cancelled = 0

    def observe(self, stats: EngineStats) -> None:
        """Record the swaps since the last observation (their durations, for the histogram)."""
        new_swaps = stats.swaps - self._stats.swaps
        if new_swaps > 0:
            per = (stats.swap_seconds_total - self._stats.swap_seconds_total) / new_swaps
            self._swap_events.extend([stats.last_swap_seconds] if new_swaps == 1 else [per] * new_swaps)
        self._stats = stats

    def served_by(self, info: BatchInfo) -> ServedBy:
        return ServedBy(
            replica=self.replica, batch_size=info.batch_size, swapped=info.swapped, queue_ms=info.queue_seconds * 1000
        )

    def report(self, sched: SchedulerStats) -> ReplicaReport:
        """Events since the previous report (handed over once), plus gauges now; `sched` is the
        scheduler's drained snapshot (`Scheduler.stats(drain=True)`)."""
        now, before = self._stats, self._reported
        swaps, self._swap_events = self._swap_events, []
        self._reported = now
        mode_switches = max(0, sched.mode_switches - self._reported_mode_switches)
        self._reported_mode_switches = sched.mode_switches
        cancelled = max(0, sched.sequences_cancelled - self._reported_cancelled)
        self._reported_cancelled = sched.sequences_cancelled
        return ReplicaReport(
            replica=self.replica,
            swap_seconds=swaps,
            cache_hits=max(0, now.cache_hits - before.cache_hits),
            cache_misses=max(0, now.cache_misses - before.cache_misses),
            cache_evictions=max(0, now.cache_evictions - before.cache_evictions),
            batch_sizes=sched.batch_sizes,
            cache_bytes=now.cache_bytes,
            queue_depth=sched.queue_depth,
            loaded_adapters=now.loaded_adapters,
            adapter_mode=sched.mode,
            mode_switches=mode_switches,
            running_sequences=sched.running_sequences,
            sequences_cancelled=cancelled,
        )
