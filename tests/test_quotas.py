"""Per-tenant quotas (serving/quotas.py): the bucket and slots with a hand-driven clock, and the
429 + Retry-After answer through the real app (in process, real engine, real registry folder)."""

from __future__ import annotations

import asyncio

import pytest

from adapters.registry.backends import open_store
from adapters.registry.keys import KeyStore, Role
from adapters.tasks.errors import TooManyRequests
from serving.quotas import TenantQuotas
from tests.conftest import MINILM_ID
from tests.serve_helpers import error_of
from tests.test_ingress_inprocess import _client, engine, make_app  # noqa: F401 - the engine fixture


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_bucket_refills_and_tells_when():
    clock = Clock()
    q = TenantQuotas(None, 2.0, clock=clock)
    q.admit("a")()
    q.admit("a")()  # a burst of one second's worth
    with pytest.raises(TooManyRequests) as exc:
        q.admit("a")
    assert exc.value.retry_after == 1
    q.admit("b")()  # another tenant has its own bucket
    clock.now += 0.5  # one token back at 2/s
    q.admit("a")()
    with pytest.raises(TooManyRequests):
        q.admit("a")


def test_slow_rate_says_how_long_to_wait():
    clock = Clock()
    q = TenantQuotas(None, 0.1, clock=clock)
    q.admit("a")()
    with pytest.raises(TooManyRequests) as exc:
        q.admit("a")
    assert exc.value.retry_after == 10


def test_concurrent_slots_are_given_back_once():
    q = TenantQuotas(2, None, clock=Clock())
    r1, r2 = q.admit("a"), q.admit("a")
    with pytest.raises(TooManyRequests):
        q.admit("a")
    r1()
    r1()  # a second release of the same request gives nothing more back
    r3 = q.admit("a")
    with pytest.raises(TooManyRequests):
        q.admit("a")
    r2(), r3()
    assert not TenantQuotas(None, None).enabled


def test_over_quota_is_429_with_retry_after(engine, tmp_path):  # noqa: F811
    registry = tmp_path / "reg"
    app, server = make_app(engine, registry, api_keys="shared-key", tenant_requests_per_s=0.01,
                           tenant_max_concurrent=1)
    keys = KeyStore(open_store(str(registry)))
    a, b = keys.create("a", Role.reader).key, keys.create("b", Role.reader).key
    body = {"model": MINILM_ID, "input": "hi"}

    async def main():
        async with await _client(app) as c:
            post = lambda key: c.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"})  # noqa: E731
            assert (await post(a)).status_code == 200
            over = await post(a)
            assert over.status_code == 429 and error_of(over)["type"] == "rate_limit_error"
            assert int(over.headers["retry-after"]) == 100
            assert (await post(b)).status_code == 200  # its own quota
            for _ in range(3):  # no tenant: no quota
                assert (await post("shared-key")).status_code == 200
        await server.scheduler.close()

    asyncio.run(main())


def test_slots_come_back_when_responses_end(engine, tmp_path):  # noqa: F811
    registry = tmp_path / "reg"
    app, server = make_app(engine, registry, tenant_max_concurrent=1)
    key = KeyStore(open_store(str(registry))).create("a", Role.reader).key
    body = {"model": MINILM_ID, "input": "hi"}

    async def main():
        async with await _client(app) as c:
            for _ in range(4):  # one at a time: each finds the slot the last one gave back
                r = await c.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200, r.text
        await server.scheduler.close()

    asyncio.run(main())
