"""The HTTP ingress: FastAPI routes of docs/http-api.md over Ray Serve (`serve.ingress`).

Routes only map service results to HTTP: a response model becomes JSON, an iterator
becomes Server-Sent Events, an exception becomes the error body (docs/http-api.md#errors) with the status
`serving.api.errors.status_for` gives it. The service logic is in one module per endpoint
family (serve_embeddings, serve_classify, serve_qa, serve_generate, serve_models); the registry
routes come from serving.api.registry. An ASGI middleware records the metrics of every
request and writes one JSON access-log line per inference request.

`create_api(...)` builds the app without Ray (any `ModelClient` will do); `Ingress` is
the Ray Serve deployment that builds it around a handle to the model deployment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.registry.backends import open_store
from adapters.registry.resolver import AdapterResolver
from adapters.registry.store import RegistryStore
from adapters.tasks.images import ImageLimits
from serving import serve_classify, serve_embeddings, serve_generate, serve_models, serve_qa
from fastapi.concurrency import run_in_threadpool

from adapters.registry.keys import KeyStore
from serving.api.auth import AuthSettings, Principal, principal_of
from serving.api.body_limit import BodyLimit
from serving.api.errors import ErrorMappingRoute, unwrap
from serving.api.errors import error_body
from serving.api.registry import RegistrySettings, build_registry_router
from serving.cluster_env import RegistryEnv
from serving.coalesce import CALLS_PER_WORKER, CoalescingClient
from serving.config import ServeConfig
from serving.drain import DrainGate, DrainMiddleware
from serving.metrics import CONTENT_TYPE, ServerMetrics
from serving.quotas import TenantQuotas
from serving.protocol import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelList,
    QuestionAnsweringRequest,
    QuestionAnsweringResponse,
    render,
)
from serving.registry_probe import RegistryProbe
from serving.replica_io import IDEMPOTENT, ReplicaCall, ReplicaInfo, ReplicaResult
from serving.replica_logging import log_to_stderr
from serving.service import RequestLimits, RequestRecord, ServingContext

access_log = logging.getLogger("capaserve.access")
log = logging.getLogger("capaserve.ingress")
ready_log = logging.getLogger("capaserve.readiness")


def json_response(body: BaseModel) -> Response:
    """A response model as JSON (`serving.protocol.render`: orjson, numpy vectors as they are)."""
    return Response(render(body), media_type="application/json")


if not access_log.handlers:
    _h = logging.StreamHandler(sys.stderr)
    _h.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(_h)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False

UNMETERED = {"/metrics", "/healthz", "/readyz"}
ROUTES = {
    "/v1/embeddings", "/v1/classify", "/v1/question-answering", "/v1/completions", "/v1/chat/completions", "/v1/models",
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
}


def _route_label(path: str) -> str:
    """A bounded route label for requests that carry no record (registry, 404s)."""
    if path == "/v1/adapters" or path.startswith("/v1/adapters/"):
        return "/v1/adapters"
    if path in ROUTES:
        return path
    return "other"


class Metered:
    """ASGI middleware: request count and latency (to the last byte), TTFT, tokens, access log."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in UNMETERED:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500, "done": False}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._finish(scope, status, start)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            # The client went away and Serve cancelled its request (a disconnect seen by a route
            # is mapped to 499 by serving.api.errors.status_for): not a server error.
            status["code"] = 499
            raise
        finally:
            if not status["done"]:
                if status["code"] == 200:
                    status["code"] = 499  # started, then the client went away
                self._finish(scope, status, start)

    def _finish(self, scope: dict, status: dict, start: float) -> None:
        if status["done"]:
            return
        status["done"] = True
        seconds = time.perf_counter() - start
        release = scope.get("state", {}).get("quota_release")
        if release is not None:
            release()
        record: RequestRecord | None = scope.get("state", {}).get("record")
        path = scope.get("path", "")
        route = record.route if record else _route_label(path)
        adapter = self.metrics.adapter_label(record.target_label if record else None)
        code = status["code"]
        self.metrics.observe_request(route, adapter, code, seconds)
        if record is None:
            return
        self.metrics.observe_tokens(route, adapter, record.prompt_tokens, record.completion_tokens)
        if record.served_by is not None and record.served_by.swapped:
            self.metrics.swapped_requests.labels(adapter).inc()
        if record.first_token_s is not None:
            self.metrics.ttft.labels(route, adapter).observe(record.first_token_s)
        line = {"event": "request", "status": code, "latency_ms": round(seconds * 1000, 3), **record.log_fields()}
        access_log.info(json.dumps(line))


def create_api(
    ctx: ServingContext,
    store: RegistryStore,
    settings: RegistrySettings,
    gate: DrainGate | None = None,
) -> FastAPI:
    """The FastAPI app: inference routes, registry routes, health and metrics; with a `gate`,
    requests in progress are counted and, once it drains, new ones refused (serving/drain.py)."""
    app = FastAPI(title="capaserve", version="0.1.0")
    api = APIRouter(route_class=ErrorMappingRoute, responses=ERROR_RESPONSES)
    sse = {200: {"description": "JSON, or Server-Sent Events when `stream` is true.", "content": {"text/event-stream": {}}}}

    async def admitted(request: Request, authorization: str | None = Header(None)) -> Principal:
        """An inference caller within its tenant's quota (serving/quotas.py); the slot is given
        back by `Metered` when the response ends."""
        who = await settings.auth.reader(request, authorization)
        if who.tenant is not None and ctx.quotas.enabled:
            request.state.quota_release = ctx.quotas.admit(who.tenant)
        return who

    keyed = [Depends(admitted)]

    def record(request: Request, route: str) -> RequestRecord:
        rec = RequestRecord(route=route, viewer=principal_of(request))
        request.state.record = rec
        return rec

    @api.post("/v1/embeddings", dependencies=keyed, response_model=EmbeddingResponse)
    async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
        res = await serve_embeddings.create_embeddings(ctx, body, record(request, "/v1/embeddings"))
        return json_response(res)

    @api.post("/v1/classify", dependencies=keyed, response_model=ClassifyResponse)
    async def classify(body: ClassifyRequest, request: Request) -> JSONResponse:
        """Label and probabilities per input: texts with a sequence-classification adapter, or
        images (data URLs; nothing is fetched) with an image-classification adapter."""
        res = await serve_classify.classify(ctx, body, record(request, "/v1/classify"))
        return json_response(res)

    @api.post("/v1/question-answering", dependencies=keyed, response_model=QuestionAnsweringResponse)
    async def question_answering(body: QuestionAnsweringRequest, request: Request) -> JSONResponse:
        """Extractive answers of a question-answering adapter: per {question, context}, the best
        span over the context's overlapping windows, with its score and character offsets."""
        res = await serve_qa.answer(ctx, body, record(request, "/v1/question-answering"))
        return json_response(res)

    @api.post("/v1/completions", dependencies=keyed, response_model=CompletionResponse, responses=sse)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        rec = record(request, "/v1/completions")
        if body.stream:
            return StreamingResponse(await serve_generate.stream_completion(ctx, body, rec), media_type="text/event-stream")
        return json_response(await serve_generate.create_completion(ctx, body, rec))

    @api.post("/v1/chat/completions", dependencies=keyed, response_model=ChatCompletionResponse, responses=sse)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        rec = record(request, "/v1/chat/completions")
        if body.stream:
            events = await serve_generate.stream_chat_completion(ctx, body, rec)
            return StreamingResponse(events, media_type="text/event-stream")
        return json_response(await serve_generate.create_chat_completion(ctx, body, rec))

    @api.get("/v1/models", response_model=ModelList)
    async def models(who: Principal = Depends(settings.auth.reader)) -> JSONResponse:
        return json_response(await serve_models.list_models(ctx, store, who))

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    registry_probe = RegistryProbe(store, "the ingress")
    readiness = {"reason": ""}  # the last reason logged ("": ready, or nothing logged yet)

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        """200 while a model replica answers (its engine is loaded) and the registry answers both
        that replica and this ingress; else 503. The body says which part is not ready; the
        reason, which may name internal hosts, goes to the log only, once per change."""
        detail = None
        try:
            info = await ctx.refresh_info(timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - not ready, whatever the reason
            message, detail = "model deployment not ready: no replica answered", type(unwrap(exc)).__name__
        else:
            if info.registry_error:
                message, detail = "adapter registry unreachable from a model replica", info.registry_error
            elif own := await registry_probe.error():
                message, detail = "adapter registry unreachable from the ingress", own
        if detail is not None:
            if readiness["reason"] != f"{message}: {detail}":
                readiness["reason"] = f"{message}: {detail}"
                ready_log.warning("not ready: %s", readiness["reason"])
            return JSONResponse(error_body(message, "unavailable", 503), status_code=503)
        if readiness["reason"]:
            ready_log.info("ready again")
            readiness["reason"] = ""
        return JSONResponse({"status": "ready", "model": info.model_id})

    @api.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics(request: Request) -> Response:
        """Open while no key is configured; else an admin key's only: the labels name tenants' adapters."""
        if await run_in_threadpool(settings.auth.configured):
            await settings.auth.admin(request, request.headers.get("authorization"))
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    async def on_change(name: str) -> None:
        ctx.resolver.forget(name)  # replicas notice deletions with their own registry sweep

    app.include_router(api)
    app.include_router(build_registry_router(store, settings, ctx.base_spec, on_change))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, exc.status_code), status_code=exc.status_code)

    if gate is not None:
        app.add_middleware(DrainMiddleware, gate=gate)  # inside Metered: refusals are counted too
    app.add_middleware(BodyLimit, limit=ctx.limits.max_body_bytes)
    app.add_middleware(Metered, metrics=ctx.metrics)  # outermost: refusals and 413s are metered too
    return app


def replica_lost(exc: BaseException) -> bool:
    """Whether a replica call failed because its replica went away (killed, crashed, its node
    lost), not because of the request: Ray's actor errors, also when wrapped in a task error."""
    return isinstance(exc, RayActorError) or isinstance(getattr(exc, "cause", None), RayActorError)


class HandleClient:
    """`ModelClient` over a Ray Serve handle: adapters go by multiplexed id, the base is load-balanced.

    A call of an `IDEMPOTENT` method whose replica is lost while it runs (or before it
    answers) is sent once more; Serve's router has dropped the dead replica by then (or
    probes it and finds it gone), so the retry runs on another one. A request's metrics are
    counted once either way: the lost attempt brings back no report, and the ingress counts
    the HTTP request, not the replica calls. `on_retry(method)` is told of each retry.
    """

    def __init__(self, handle: Any, on_retry: Callable[[str], None] | None = None) -> None:
        self.handle = handle
        self.on_retry = on_retry

    def _for(self, call: ReplicaCall, **options: Any) -> Any:
        if call.adapter is not None:
            options["multiplexed_model_id"] = call.adapter.ref
        return self.handle.options(**options) if options else self.handle

    async def _once_more_if_lost(self, method: str, send: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await send()
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a lost replica
            if method not in IDEMPOTENT or not replica_lost(exc):
                raise
            log.warning("%s call lost with its replica (%s); retrying once on another", method, type(exc).__name__)
        if self.on_retry is not None:
            self.on_retry(method)
        return await send()

    async def call(self, method: str, call: ReplicaCall) -> ReplicaResult:
        return await self._once_more_if_lost(method, lambda: getattr(self._for(call), method).remote(call))

    async def call_many(self, method: str, calls: list[ReplicaCall]) -> list[ReplicaResult | BaseException]:
        """Routed by the first call's adapter (the oldest request's); the others load there if needed."""
        return await self._once_more_if_lost(method, lambda: self._for(calls[0]).call_many.remote(method, calls))

    async def stream(self, call: ReplicaCall):  # type: ignore[override]
        gen = self._for(call, stream=True).generate_stream.remote(call)
        try:
            async for item in gen:
                yield item
        finally:
            gen.cancel()  # no-op once finished; stops the replica's stream if the client left

    async def info(self) -> ReplicaInfo:
        return await self._once_more_if_lost("info", lambda: self.handle.info.remote())


def _build_context(handle: Any, config: ServeConfig) -> tuple[ServingContext, RegistryStore, RegistrySettings]:
    registry, server = config.registry, config.server
    store = open_store(registry.location, endpoint_url=registry.endpoint_url)
    # The ingress resolves manifests only; bundle bytes are fetched by the replicas.
    resolver = AdapterResolver(store, blob_cache_bytes=0)
    auth = AuthSettings(admin_token=server.admin_token, api_keys=server.api_keys, keys=KeyStore(store))
    settings = RegistrySettings(max_upload_bytes=registry.max_upload_bytes, auth=auth,
                                allowed_paths=[Path(p) for p in registry.allowed_lora_paths])
    # Two joined calls in flight per engine worker of each model replica: one computing, one queued.
    workers, _ = config.engine_plan(config.device_type())
    metrics = ServerMetrics()
    client = CoalescingClient(
        HandleClient(handle, on_retry=lambda method: metrics.replica_retries.labels(method).inc()),
        max_inflight=CALLS_PER_WORKER * workers * server.most_replicas(),
        max_texts=config.scheduler.max_batch_size,
        join_adapters=server.most_replicas() == 1,  # one replica: no routing choice that adapters' calls must keep apart
    )
    images = ImageLimits(max_bytes=server.max_image_bytes, max_pixels=server.max_image_pixels)
    quotas = TenantQuotas(server.tenant_max_concurrent, server.tenant_requests_per_s)
    return ServingContext(client, resolver, metrics, images, RequestLimits.of(server), quotas), store, settings


@serve.ingress()
class Ingress:
    """Ray Serve ingress deployment: builds the FastAPI app around the model handle."""

    def __init__(self, model: Any, config: ServeConfig | dict[str, Any], registry_env: RegistryEnv | None = None) -> None:
        self.config = ServeConfig.model_validate(config)  # a ServeConfig passes through as is
        log_to_stderr()
        if registry_env is not None:
            registry_env.apply()  # the driver's registry credentials (serving/cluster_env.py)
        self.ctx, self.store, self.settings = _build_context(model, self.config)
        self.gate = DrainGate()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.ctx, self.store, self.settings, self.gate)

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests, wait up to `timeout_s` for those in progress; how many are left
        (`capaserve serve` calls it before stopping Serve; serving/drain.py)."""
        return await self.gate.drain(timeout_s)
