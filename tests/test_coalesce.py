"""The ingress's coalescing client, in one process against the real model deployment class.

What joining must never change: each request's vectors and token counts equal what it gets
sent alone, a joined call carries one adapter, a failure reaches every request it carried
and no other lane, a client that went away costs nothing, and replica reports are folded
in once. The reference is the same server answering each request on its own (the engine's
own equivalence with transformers is tests/test_engine_equivalence.py's business).
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from adapters.bundle import save_bundle
from adapters.synthetic import random_bundle
from serving.coalesce import CoalescingClient
from serving.config import EngineConfig
from serving.config_sources import config_of
from serving.deployments import ModelServer
from serving.engine.engine import Engine
from serving.ingress import _build_context, create_api
from serving.replica_io import ReplicaCall
from tests.conftest import MINILM_ID
from tests.serve_helpers import DirectClient

TEXTS = [
    "a short one",
    "the quick brown fox jumps over the lazy dog",
    "serving many adapters from one base model",
    "hot swap rewrites only the target weights in place",
    "x",
    "another sentence of moderate length for the batch",
]


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(num_threads=1, dtype="float32"))


@pytest.fixture()
def served(engine, tmp_path):
    """An app whose model client is a CoalescingClient over a real ModelServer, with adapter `a`."""
    args = config_of(registry=str(tmp_path / "reg"), max_batch_size=32, batch_wait_ms=0)
    server = ModelServer(args, engine=engine)
    ctx, store, settings = _build_context(None, args)
    assert isinstance(ctx.client, CoalescingClient)  # what `capaserve serve` builds
    joiner = CoalescingClient(DirectClient(server), max_inflight=1, max_texts=8)
    ctx.client = joiner
    app = create_api(ctx, store, settings)
    targets = ["encoder.layer.0.attention.self.query", "encoder.layer.3.output.dense"]
    data = {
        name: save_bundle(random_bundle(engine.spec, targets, seed=seed), tmp_path / f"{name}.safetensors").read_bytes()
        for name, seed in (("a", 3), ("b", 4))
    }

    async def upload():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            for name, blob in data.items():
                assert (await c.put(f"/v1/adapters/{name}", content=blob)).status_code == 201

    asyncio.run(upload())
    yield app, joiner, server, ctx
    asyncio.run(server.scheduler.close())


def _requests() -> list[dict]:
    out = []
    for i in range(12):
        model = "a" if i % 3 == 0 else MINILM_ID
        texts = [TEXTS[(i + k) % len(TEXTS)] for k in range(1 + i % 3)]
        out.append({"model": model, "input": texts})
    return out


def test_joined_requests_answer_as_if_sent_alone(served):
    app, joiner, server, ctx = served
    bodies = _requests()

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            alone = [(await c.post("/v1/embeddings", json=b)).json() for b in bodies]  # one at a time: nothing to join
            sent_alone = joiner.calls_sent
            together = await asyncio.gather(*(c.post("/v1/embeddings", json=b) for b in bodies))
            metrics = (await c.get("/metrics")).text
        return alone, sent_alone, [r.json() for r in together], metrics

    alone, sent_alone, together, metrics = asyncio.run(main())
    assert sent_alone == len(bodies)
    joined_calls = joiner.calls_sent - sent_alone
    assert joined_calls < len(bodies), "concurrent requests were not joined"
    assert joiner.requests_joined == 2 * len(bodies)
    for body, a, t in zip(bodies, alone, together):
        assert t["model"] == body["model"]
        assert t["usage"] == a["usage"]
        assert [d["index"] for d in t["data"]] == list(range(len(body["input"])))
        np.testing.assert_allclose(
            np.array([d["embedding"] for d in t["data"]]), np.array([d["embedding"] for d in a["data"]]), atol=1e-5
        )
    # adapter and base outputs differ, so a joined call never mixed the two lanes' weights
    assert not np.allclose(together[0]["data"][0]["embedding"], together[1]["data"][0]["embedding"], atol=1e-3)
    assert not joiner._lanes  # nothing left behind
    # each batch and request the replica ran is counted once, though a joined call answers several requests
    def total(name: str) -> float:
        return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name))

    stats = server.scheduler.stats()
    assert total("capaserve_batch_size_requests_count") == stats.batches
    assert total("capaserve_batch_size_requests_sum") == stats.requests == joiner.calls_sent


def test_a_failed_joined_call_fails_its_requests_only(served):
    app, joiner, server, ctx = served
    good = ctx.resolver.resolve("a")
    missing = good.model_copy(update={"sha256": "0" * 64, "version": good.version + 1})

    async def main():
        calls = [ReplicaCall(adapter=missing if i % 2 else good, texts=[TEXTS[i % len(TEXTS)]]) for i in range(8)]
        return await asyncio.gather(*(joiner.call("embed", c) for c in calls), return_exceptions=True)

    results = asyncio.run(main())
    failed = [r for r in results[1::2]]
    assert all(isinstance(r, Exception) for r in failed), failed
    assert len({type(r) for r in failed}) == 1
    assert all(not isinstance(r, Exception) and len(r.outputs) == 1 for r in results[0::2]), results
    assert not joiner._lanes


def test_a_request_whose_client_left_is_not_computed(served):
    app, joiner, server, ctx = served

    async def main():
        first = asyncio.create_task(joiner.call("embed", ReplicaCall(texts=[TEXTS[0]])))
        await asyncio.sleep(0)  # `first` is in flight, so the next two wait
        gone = asyncio.create_task(joiner.call("embed", ReplicaCall(texts=[TEXTS[1]])))
        kept = asyncio.create_task(joiner.call("embed", ReplicaCall(texts=[TEXTS[2]])))
        await asyncio.sleep(0)
        gone.cancel()
        alone = await DirectClient(server).call("embed", ReplicaCall(texts=[TEXTS[2]]))
        return await first, await kept, alone, gone

    first, kept, alone, gone = asyncio.run(main())
    assert gone.cancelled()
    assert joiner.calls_sent == 2 and joiner.requests_joined == 2  # `gone` was never sent
    np.testing.assert_allclose(np.asarray(kept.outputs[0]), np.asarray(alone.outputs[0]), atol=1e-5)
    assert not joiner._lanes


def test_reports_are_folded_in_once_and_big_calls_pass_through(served):
    app, joiner, server, ctx = served

    async def main():
        first = asyncio.create_task(joiner.call("embed", ReplicaCall(texts=[TEXTS[0]])))
        await asyncio.sleep(0)
        rest = [asyncio.create_task(joiner.call("embed", ReplicaCall(texts=[t]))) for t in TEXTS[1:4]]
        results = [await first] + [await r for r in rest]
        sent = joiner.calls_sent
        big = await joiner.call("embed", ReplicaCall(texts=TEXTS + TEXTS))  # >= max_texts: sent as is
        return results, sent, big

    results, sent, big = asyncio.run(main())
    assert sent == 2
    joined = results[1:]
    assert joined[0].report is not None and all(r.report is None for r in joined[1:])
    assert all(r.served_by == joined[0].served_by for r in joined)
    assert joiner.calls_sent == 3 and len(big.outputs) == 2 * len(TEXTS)


def test_across_adapters_one_call_carries_a_part_per_adapter(served):
    """With join_adapters (one replica), requests of the base and two adapters share a call; each
    part runs as if sent alone, and a part that fails (a version the replica cannot fetch) fails
    its own requests only."""
    app, _, server, ctx = served
    joiner = CoalescingClient(DirectClient(server), max_inflight=1, max_texts=16, join_adapters=True)
    manifests = {m: ctx.resolver.resolve(m) for m in ("a", "b")}
    missing = manifests["a"].model_copy(update={"sha256": "0" * 64, "version": 99})
    plan = [None, "a", "b", "a", None, "missing", "b", None, "missing"]
    by_name = {None: None, **manifests, "missing": missing}
    calls = [ReplicaCall(adapter=by_name[m], texts=[TEXTS[i % len(TEXTS)]]) for i, m in enumerate(plan)]

    async def main():
        alone = [await DirectClient(server).call("embed", c) for c in calls if c.adapter is not missing]
        first = asyncio.create_task(joiner.call("embed", calls[0]))
        await asyncio.sleep(0)  # in flight: the rest wait and go out together
        rest = await asyncio.gather(*(joiner.call("embed", c) for c in calls[1:]), return_exceptions=True)
        return alone, [await first, *rest]

    alone, joined = asyncio.run(main())
    assert joiner.calls_sent == 2 and joiner.requests_joined == len(plan)
    ok = [r for m, r in zip(plan, joined) if m != "missing"]
    assert all(isinstance(r, Exception) for m, r in zip(plan, joined) if m == "missing")
    for got, ref in zip(ok, alone, strict=True):
        assert not isinstance(got, Exception), got
        np.testing.assert_allclose(np.asarray(got.outputs[0]), np.asarray(ref.outputs[0]), atol=1e-5)
        assert got.prompt_tokens == ref.prompt_tokens
    assert not joiner._lanes
    reports = [r.report for r in joined[1:] if not isinstance(r, Exception) and r.report is not None]
    assert len(reports) == 3  # one per part that ran (base, a, b), none twice


def test_without_join_adapters_each_adapter_keeps_its_lane(served):
    app, _, server, ctx = served
    joiner = CoalescingClient(DirectClient(server), max_inflight=1, max_texts=16)
    a, b = (ctx.resolver.resolve(m) for m in ("a", "b"))

    async def main():
        calls = [ReplicaCall(adapter=m, texts=[TEXTS[i]]) for i, m in enumerate([a, b, a, b, a, b])]
        return await asyncio.gather(*(joiner.call("embed", c) for c in calls))

    asyncio.run(main())
    assert joiner.calls_sent == 4  # first of each lane alone, then one joined call per lane
