"""The scheduler's policy, driven by a recording runner (no engine, no Ray)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from adapters.tasks.errors import Overloaded, UnsupportedTask
from serving.scheduler import Scheduler, SchedulerConfig


class Recorder:
    """Runs 'batches' by echoing (adapter, text) and records each engine call."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[str, str | None, list[str]]] = []
        self.delay = delay
        self.threads: set[str] = set()

    def run_batch(self, kinds, adapter, texts) -> list[Any]:
        self.threads.add(threading.current_thread().name)
        self.calls.append((kinds, adapter, list(texts)))
        if self.delay:
            time.sleep(self.delay)
        if any(t == "boom" for t in texts):
            raise ValueError("boom")
        return [(adapter, t) for t in texts]


def run(coro):
    return asyncio.run(coro)


def test_groups_by_adapter_and_returns_own_results():
    rec = Recorder(delay=0.02)

    async def main():
        s = Scheduler(rec, SchedulerConfig(max_batch_size=8, batch_wait_ms=20))
        reqs = [(f"a{i % 3}", f"t{i}") for i in range(24)]
        outs = await asyncio.gather(*(s.submit("embed", a, [t]) for a, t in reqs))
        await s.close()
        return reqs, outs, s.stats()

    reqs, outs, stats = run(main())
    for (a, t), (res, info) in zip(reqs, outs):
        assert res == [(a, t)]
    assert all(len({c[1]}) == 1 for c in rec.calls)
    assert len(rec.calls) <= 6  # batched, not 24 single calls
    assert stats.requests == 24 and stats.queue_depth == 0
    assert all(name.startswith("capaserve-engine") for name in rec.threads)


def test_grouping_off_runs_one_at_a_time_in_order():
    rec = Recorder()

    async def main():
        s = Scheduler(rec, SchedulerConfig(grouping=False))
        await asyncio.gather(*(s.submit("embed", f"a{i % 2}", [f"t{i}"]) for i in range(6)))
        await s.close()
        return s.stats()

    stats = run(main())
    assert [c[2] for c in rec.calls] == [[f"t{i}"] for i in range(6)]
    assert stats.adapter_switches == 5


def test_starvation_bound_switches_adapter():
    rec = Recorder(delay=0.01)

    async def main():
        s = Scheduler(rec, SchedulerConfig(max_batch_size=1, batch_wait_ms=0, starvation_ms=30))

        async def flood():
            for i in range(40):
                await s.submit("embed", "hot", [f"h{i}"])

        async def flood2():
            for i in range(40):
                await s.submit("embed", "hot", [f"g{i}"])

        async def late():
            await asyncio.sleep(0.02)
            await s.submit("embed", "cold", ["c"])

        await asyncio.gather(flood(), flood2(), late())
        await s.close()

    run(main())
    done_at = [c[1] for c in rec.calls].index("cold")
    assert done_at < 70


def test_padding_aware_chunks_and_failure_isolation():
    rec = Recorder()

    async def main():
        s = Scheduler(rec, SchedulerConfig(max_batch_size=8, batch_wait_ms=20, max_batch_tokens=100))
        good = s.submit("embed", "a", ["x" * 5, "y" * 60], lengths=[5, 60])
        short = s.submit("embed", "a", ["z" * 4], lengths=[4])
        bad = s.submit("embed", "a", ["boom"], lengths=[4])
        r = await asyncio.gather(good, short, bad, return_exceptions=True)
        await s.close()
        return r

    good, short, bad = run(main())
    assert good[0] == [("a", "x" * 5), ("a", "y" * 60)]
    assert short[0] == [("a", "z" * 4)]
    assert isinstance(bad, ValueError)
    first = rec.calls[0][2]
    assert "y" * 60 not in first or len(first) == 1  # the long text never pads short ones past the cap


def test_bounded_queue_overloads():
    rec = Recorder(delay=0.05)

    async def main():
        s = Scheduler(rec, SchedulerConfig(max_queue=2, max_batch_size=1))
        tasks = [asyncio.ensure_future(s.submit("embed", "a", [f"t{i}"])) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await s.submit("embed", "a", ["x"])
        await asyncio.gather(*tasks)
        await s.close()

    run(main())


def test_generation_without_a_decode_loop_is_refused_and_queues_nothing():
    """A runner without `decode_loop` (an encoder base): completions and streams get
    UnsupportedTask (400) before anything is queued; only encoder kinds are batched."""
    rec = Recorder()

    async def main():
        s = Scheduler(rec, SchedulerConfig())
        with pytest.raises(UnsupportedTask, match="causal LM"):
            await s.submit("generate", "a", ["p"])
        with pytest.raises(UnsupportedTask, match="causal LM"):
            async for _ in s.stream("a", "p"):
                pass
        with pytest.raises(ValueError, match="stream"):
            await s.submit("stream", "a", ["p"])
        stats, calls = s.stats(), list(rec.calls)
        after = await s.submit("embed", "a", ["ok"])
        await s.close()
        return stats, calls, after

    stats, calls, after = run(main())
    assert stats.queue_depth == 0 and stats.requests == 0 and calls == []
    assert after[0] == [("a", "ok")]


def test_encoder_batches_split_by_length_where_padding_costs_more_than_a_call():
    from serving.scheduler import _chunks

    lengths = [3, 3, 3, 3, 40, 41]
    order = list(range(len(lengths)))
    split = list(_chunks(order, lambda k: lengths[k], cap=10_000, overhead=8))
    assert split == [[0, 1, 2, 3], [4, 5]]  # 8+4*3 + 8+2*41 = 110 < 8+6*41 = 254
    assert list(_chunks(order, lambda k: lengths[k], cap=10_000, overhead=500)) == [order]  # calls too dear
    free = list(_chunks(order, lambda k: lengths[k], cap=10_000, overhead=0))  # calls cost nothing: no padding
    assert all(len({lengths[k] for k in c}) == 1 for c in free) and sorted(k for c in free for k in c) == order
    capped = list(_chunks(order, lambda k: lengths[k], cap=60, overhead=1000))
    assert all(len(c) * max(lengths[k] for k in c) <= 60 or len(c) == 1 for c in capped)
    assert sorted(k for c in capped for k in c) == order

    rec = Recorder()

    async def main():
        s = Scheduler(rec, SchedulerConfig(max_batch_size=8, batch_wait_ms=20, call_overhead_tokens=8))
        outs = await asyncio.gather(
            *(s.submit("embed", "a", ["x" * n], lengths=[n]) for n in lengths),
            s.submit("classify", "a", ["y" * 2], lengths=[2]),
        )
        await s.close()
        return outs

    outs = run(main())
    assert [o[0] for o in outs] == [[("a", "x" * n)] for n in lengths] + [[("a", "yy")]]
    assert sorted(len(c[2]) for c in rec.calls) == [2, 5]  # one batch, two calls: short ones, long ones


def test_unpadded_runner_batches_are_spread_over_workers_not_cut_for_padding():
    """A runner that computes only real tokens gains nothing from length splits: a batch is one
    call per engine worker at equal shares of its tokens while each gets `overhead` tokens,
    cut again only for the padded cap."""
    from serving.scheduler import _chunks, _spread

    lengths = [3, 3, 3, 3, 40, 41]
    order = list(range(len(lengths)))
    length = lambda k: lengths[k]  # noqa: E731
    assert list(_chunks(order, length, cap=10_000, overhead=8, unpadded=True)) == [order]
    capped = list(_chunks(order, length, cap=100, overhead=8, unpadded=True))
    assert capped == [[0, 1, 2, 3], [4, 5]]  # 6 x 41 > 100: the fewest calls under the cap
    assert list(_spread(order, length, workers=1, cap=10_000, overhead=8)) == [order]
    assert list(_spread(order, length, workers=2, cap=10_000, overhead=8)) == [[0, 1, 2, 3, 4], [5]]  # 52 | 41 tokens
    assert list(_spread(order, length, workers=2, cap=10_000, overhead=60)) == [order]  # 93 tokens: one call's worth
    assert list(_spread(order, length, workers=4, cap=100, overhead=8)) == [[0, 1, 2, 3], [4], [5]]

    rec = Recorder()

    async def main():
        s = Scheduler(rec, SchedulerConfig(max_batch_size=8, batch_wait_ms=20, call_overhead_tokens=8), unpadded=True)
        outs = await asyncio.gather(*(s.submit("embed", "a", ["x" * n], lengths=[n]) for n in lengths))
        await s.close()
        return outs

    outs = run(main())
    assert [o[0] for o in outs] == [[("a", "x" * n)] for n in lengths]
    assert [len(c[2]) for c in rec.calls] == [6]  # one batch, one call

    rec = Recorder()

    async def idle_workers():  # one request of six texts while both workers idle: spread over both
        s = Scheduler(rec, SchedulerConfig(call_overhead_tokens=8), workers=2, unpadded=True)
        out = await s.submit("embed", "a", ["x" * n for n in lengths], lengths=lengths)
        await s.close()
        return out

    assert run(idle_workers())[0] == [("a", "x" * n) for n in lengths]
    assert sorted(len(c[2]) for c in rec.calls) == [1, 5]  # 52 | 41 tokens


class Intervals(Recorder):
    """Records when each batch ran, on which worker, with which adapter."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.spans: list[tuple[float, float, str | None]] = []
        self._lock = threading.Lock()

    def run_batch(self, kinds, adapter, texts) -> list[Any]:
        t0 = time.monotonic()
        out = super().run_batch(kinds, adapter, texts)
        with self._lock:
            self.spans.append((t0, time.monotonic(), adapter))
        return out


def test_workers_overlap_batches_of_one_adapter_never_of_two():
    rec = Intervals(delay=0.05)

    async def main():
        s = Scheduler(rec, SchedulerConfig(max_batch_size=2, batch_wait_ms=0, starvation_ms=1000), workers=2)
        same = await asyncio.gather(*(s.submit("embed", "a", [f"t{i}"]) for i in range(8)))
        mixed = await asyncio.gather(*(s.submit("embed", a, [f"u{i}"]) for i, a in enumerate(["a", "b"] * 6)))
        await s.close()
        return same, mixed

    same, mixed = run(main())
    assert [r for r, _ in same] == [[("a", f"t{i}")] for i in range(8)]
    assert [r for r, _ in mixed] == [[(a, f"u{i}")] for i, a in enumerate(["a", "b"] * 6)]
    overlaps = [(x, y) for i, x in enumerate(rec.spans) for y in rec.spans[i + 1:] if x[0] < y[1] and y[0] < x[1]]
    assert any(x[2] == y[2] for x, y in overlaps)  # two workers did run side by side
    assert all(x[2] == y[2] for x, y in overlaps), "batches of different adapters overlapped"
    assert len(rec.threads) == 2


def test_requests_wait_for_their_adapters_readiness_while_others_run():
    """A request given `ready` joins its queue when `ready` is done (no engine call for it
    before); other adapters' requests run meanwhile; a failed `ready` fails its requests only,
    and a cancelled waiting request frees its queue place."""
    rec = Recorder()

    async def main():
        s = Scheduler(rec, SchedulerConfig(max_queue=3, max_batch_size=8, batch_wait_ms=0))
        loop = asyncio.get_running_loop()
        cold, broken, dropped = loop.create_future(), loop.create_future(), loop.create_future()
        waiting = asyncio.ensure_future(s.submit("embed", "cold", ["c"], ready=cold))
        failing = asyncio.ensure_future(s.submit("embed", "broken", ["b"], ready=broken))
        gone = asyncio.ensure_future(s.submit("embed", "gone", ["g"], ready=dropped))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):  # three waiting: the queue is full
            await s.submit("embed", "hot", ["x"])
        gone.cancel()
        await asyncio.sleep(0)
        dropped.set_result(None)  # its request was cancelled meanwhile: it never runs
        hot = [await s.submit("embed", "hot", [f"h{i}"]) for i in range(3)]
        assert not waiting.done() and [c[1] for c in rec.calls] == ["hot"] * 3
        broken.set_exception(LookupError("no such blob"))
        with pytest.raises(LookupError):
            await failing
        cold.set_result(None)
        out, _ = await waiting
        stats = s.stats()
        await s.close()
        return hot, out, stats

    hot, out, stats = run(main())
    assert [h[0] for h in hot] == [[("hot", f"h{i}")] for i in range(3)]
    assert out == [("cold", "c")] and stats.queue_depth == 0
    assert [c[1] for c in rec.calls] == ["hot"] * 3 + ["cold"]  # neither the broken nor the cancelled one ran


def test_switches_go_round_robin_over_tenants():
    """Tenant a has four adapters' work queued before tenant b's two: each switch goes to the
    next tenant, so b is served second and fourth, not after all of a's queues."""
    rec = Recorder(delay=0.005)

    async def main():
        s = Scheduler(rec, SchedulerConfig(max_batch_size=8, batch_wait_ms=0, starvation_ms=60_000))
        reqs = [(f"a/{i}@1", f"t{i}{j}") for i in range(1, 5) for j in range(2)]
        reqs += [(f"b/{i}@1", f"u{i}{j}") for i in range(1, 3) for j in range(2)]
        await asyncio.gather(*(s.submit("embed", a, [t]) for a, t in reqs))
        await s.close()

    run(main())
    order = [adapter for _, adapter, _ in rec.calls]
    served = [a for i, a in enumerate(order) if i == 0 or order[i - 1] != a]  # one entry per switch
    assert served == ["a/1@1", "b/1@1", "a/2@1", "b/2@1", "a/3@1", "a/4@1"], order


def test_one_tenant_keeps_the_oldest_first_order():
    rec = Recorder(delay=0.005)

    async def main():
        s = Scheduler(rec, SchedulerConfig(max_batch_size=8, batch_wait_ms=0, starvation_ms=60_000))
        await asyncio.gather(*(s.submit("embed", a, ["x"]) for a in ["s2", "s1", "s3", None]))
        await s.close()

    run(main())
    assert [adapter for _, adapter, _ in rec.calls] == ["s2", "s1", "s3", None]
