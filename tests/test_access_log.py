"""The ingress' metering middleware: a request whose client went away is logged as 499,
never as a server error (Ray Serve cancels the request's task when its client disconnects)."""

from __future__ import annotations

import asyncio
import json
import logging

from serving.ingress import Metered
from serving.metrics import ServerMetrics
from serving.service import RequestRecord


def _count(metrics: ServerMetrics, status: str) -> float:
    value = metrics.requests.labels("/v1/embeddings", "base", status)._value.get()  # noqa: SLF001 - test read
    return float(value)


async def _run(app, cancel_after: float | None) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/v1/embeddings", "method": "POST", "state": {}}
    task = asyncio.create_task(app(scope, receive, send))
    if cancel_after is not None:
        await asyncio.sleep(cancel_after)
        task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return sent


def _app(respond: bool, stream_then_hang: bool = False):
    async def app(scope, receive, send) -> None:
        rec = RequestRecord(route="/v1/embeddings")
        rec.target_label = "base"
        scope["state"]["record"] = rec
        if respond or stream_then_hang:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"x", "more_body": stream_then_hang})
        if stream_then_hang or not respond:
            await asyncio.sleep(30)

    return app


def test_cancelled_before_answer_is_499_and_finished_request_is_200():
    metrics = ServerMetrics()
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("capaserve.access")
    log.addHandler(handler)
    try:
        asyncio.run(_run(Metered(_app(respond=False), metrics), cancel_after=0.05))
        asyncio.run(_run(Metered(_app(respond=False, stream_then_hang=True), metrics), cancel_after=0.05))
        asyncio.run(_run(Metered(_app(respond=True), metrics), cancel_after=None))
    finally:
        log.removeHandler(handler)
    assert _count(metrics, "499") == 2
    assert _count(metrics, "200") == 1
    assert _count(metrics, "500") == 0
    statuses = [json.loads(line)["status"] for line in lines]
    assert statuses == [499, 499, 200]


def test_route_that_sees_a_disconnect_is_499_not_500():
    """A route reading the body of a request whose client left gets starlette's ClientDisconnect;
    the error mapping turns it into 499 (nginx's "client closed request"), never 500."""
    from fastapi import FastAPI
    from starlette.requests import ClientDisconnect

    from serving.api.errors import status_for
    from serving.api.errors import ErrorMappingRoute

    assert status_for(ClientDisconnect()) == (499, "client_closed_request")

    api = FastAPI()
    api.router.route_class = ErrorMappingRoute

    @api.post("/v1/embeddings")
    async def embeddings() -> dict:
        raise ClientDisconnect()

    metrics = ServerMetrics()

    async def main() -> list[dict]:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/v1/embeddings", "method": "POST", "headers": [],
                 "query_string": b"", "state": {}}
        await Metered(api, metrics)(scope, receive, send)
        return sent

    sent = asyncio.run(main())
    assert sent[0]["status"] == 499
    assert _count_any(metrics, "499") == 1 and _count_any(metrics, "500") == 0


def _count_any(metrics: ServerMetrics, status: str) -> float:
    return sum(s.value for m in metrics.requests.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels.get("status") == status)
