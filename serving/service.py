"""What every endpoint family shares on the ingress: resolving `model`, calling replicas,
and the per-request record that the access log and metrics read.

`model` resolution (docs/http-api.md#model-references): the base model id means the base; otherwise it is
an adapter `name` (latest version) or `name@version`, resolved against the registry on
every request, so a new version is served by the next request and a deleted one is 404.
The resolved manifest travels with the call and its `ref` (name@version) is the
multiplexed model id, so Ray routes it to a replica that already holds that adapter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from adapters.bundle import Task
from adapters.manifest import AdapterManifest, parse_model_ref
from adapters.registry.resolver import AdapterResolver
from adapters.registry.store import AdapterNotFound, not_found
from adapters.tasks.errors import InvalidRequest, ModelNotFound, UnsupportedTask
from adapters.tasks.images import ImageLimits, image_bytes, is_image_data_url
from adapters.validation import BaseModelSpec
from serving.api.auth import Principal
from serving.config import ServerConfig
from serving.metrics import ServerMetrics
from serving.quotas import TenantQuotas
from serving.replica_io import ReplicaCall, ReplicaInfo, ReplicaResult, ServedBy, StreamItem


class ModelClient(Protocol):
    """How the ingress reaches the model deployment (a Ray handle in production)."""

    async def call(self, method: str, call: ReplicaCall) -> ReplicaResult: ...

    async def call_many(self, method: str, calls: list[ReplicaCall]) -> list[ReplicaResult | BaseException]:
        """Several calls of one method in one replica request, answered each as if sent alone
        (an exception in place of a call's result fails that call only)."""
        ...

    def stream(self, call: ReplicaCall) -> AsyncIterator[StreamItem]: ...

    async def info(self) -> ReplicaInfo: ...


@dataclass
class RequestRecord:
    """Filled in while a request is served; the access log line and metrics read it."""

    route: str
    start: float = field(default_factory=time.perf_counter)
    adapter: str | None = None
    model: str | None = None
    #: metric label: "base", the adapter's name, or "unknown" for a model not served here
    target_label: str | None = None
    served_by: ServedBy | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    #: who asks: `model` resolves only to adapters it may see (None: every adapter)
    viewer: Principal | None = None

    def log_fields(self) -> dict[str, Any]:
        s = self.served_by
        return {
            "route": self.route,
            "model": self.model,
            "adapter": self.adapter,
            "replica": s.replica if s else None,
            "batch_size": s.batch_size if s else None,
            "swapped": s.swapped if s else None,
            "queue_ms": round(s.queue_ms, 3) if s else None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": round(self.first_token_s * 1000, 3) if self.first_token_s is not None else None,
        }


@dataclass(frozen=True)
class Target:
    """What `model` resolved to: the base (adapter None) or one adapter version."""

    model: str
    adapter: AdapterManifest | None

    @property
    def task(self) -> Task | None:
        return self.adapter.task if self.adapter is not None else None


#: The default bound on an input's characters, per token of the model's longest sequence: more
#: than any tokenizer makes of real text (WordPiece turns a word over 100 characters into one
#: unknown token; BPE tokens seldom exceed 20), so the bound only stops what cannot fit anyway.
CHARS_PER_TOKEN = 64


@dataclass(frozen=True)
class RequestLimits:
    """What one inference request may hold (docs/http-api.md#limits), checked before any compute."""

    max_body_bytes: int
    max_inputs: int
    #: None: CHARS_PER_TOKEN x the model's longest sequence
    max_input_chars: int | None

    @classmethod
    def of(cls, server: ServerConfig) -> "RequestLimits":
        return cls(server.max_body_bytes, server.max_inputs, server.max_input_chars)

    def chars_for(self, max_seq_len: int) -> int:
        return self.max_input_chars or CHARS_PER_TOKEN * max_seq_len


class ServingContext:
    """The ingress's state shared by the endpoint families."""

    def __init__(
        self,
        client: ModelClient,
        resolver: AdapterResolver,
        metrics: ServerMetrics,
        image_limits: ImageLimits,
        limits: RequestLimits | None = None,
        quotas: TenantQuotas | None = None,
    ) -> None:
        self.client = client
        self.resolver = resolver
        self.metrics = metrics
        self.image_limits = image_limits
        self.limits = limits or RequestLimits.of(ServerConfig())
        self.quotas = quotas or TenantQuotas(None, None)
        self._info: ReplicaInfo | None = None
        self._info_lock = asyncio.Lock()
        #: the base's `created` in /v1/models: when this ingress first heard from a loaded replica
        self.base_created: int | None = None

    async def check_inputs(self, texts: Sequence[str], what: str = "input") -> None:
        """InvalidRequest (400) for more inputs than `max_inputs` or one longer than the character
        bound: refused at the ingress, before a replica tokenizes anything (a 4 M-character text
        took seconds to be refused by the token check and crossed to the replica first). On an
        image base the items are data URLs, bounded by the image limits (`encoder_call`) instead."""
        if len(texts) > self.limits.max_inputs:
            raise InvalidRequest(f"{what} has {len(texts)} items; at most {self.limits.max_inputs} per request")
        if await self.modality() == "image":
            return
        info = await self.info()
        bound = self.limits.chars_for(info.max_seq_len)
        for i, text in enumerate(texts):
            if len(text) > bound:
                raise InvalidRequest(
                    f"{what} {i} has {len(text)} characters; at most {bound} per input "
                    f"(the model takes at most {info.max_seq_len} tokens)"
                )

    async def info(self, timeout: float | None = None) -> ReplicaInfo:
        """The base model's info, fetched once from a model replica."""
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    coro = self.client.info()
                    self._info = await (asyncio.wait_for(coro, timeout) if timeout else coro)
                    self.base_created = self.base_created or int(time.time())
        return self._info

    async def refresh_info(self, timeout: float) -> ReplicaInfo:
        """Ask a model replica again (readiness), within `timeout` seconds."""
        self._info = await asyncio.wait_for(self.client.info(), timeout)
        self.base_created = self.base_created or int(time.time())
        return self._info

    async def base_spec(self) -> BaseModelSpec:
        return BaseModelSpec.from_dict((await self.info()).spec)

    async def base_task(self) -> Task:
        return Task((await self.info()).task)

    async def modality(self) -> str:
        """text or image: what the base model (and so every adapter) takes as input."""
        return str((await self.info()).spec.get("modality", "text"))

    async def encoder_call(self, target: Target, items: list[str]) -> ReplicaCall:
        """The replica call for embeddings or classify inputs: texts as they are, except that an
        image data URL on a text base is refused (400: its characters are no text to embed or
        label; an `http(s)://` string is text, as OpenAI's and TEI's embeddings take it, since
        nothing is fetched); on an image base every item must be an image data URL, checked here
        (400, or 413 for its size, off the event loop) so a bad image never reaches a replica or a batch."""
        if await self.modality() != "image":
            for i, text in enumerate(items):
                if is_image_data_url(text):
                    raise InvalidRequest(
                        f"input {i} is an image (a data:image/... URL), but the base model {(await self.info()).model_id!r} "
                        "takes text; send images to a server whose base is an image model"
                    )
            return ReplicaCall(adapter=target.adapter, texts=items)
        limits = self.image_limits
        images = await asyncio.to_thread(lambda: [image_bytes(x, i, limits) for i, x in enumerate(items)])
        return ReplicaCall(adapter=target.adapter, images=images)

    async def resolve(self, model: str, record: RequestRecord) -> Target:
        """`model` -> Target; InvalidRequest (400) for a malformed `name@version`, ModelNotFound
        (404) with the resolver's reason when it is well formed but names nothing served here."""
        info = await self.info()
        record.model = model
        if model == info.model_id:
            record.target_label = "base"
            return Target(model=model, adapter=None)
        record.target_label = "unknown"
        try:
            parse_model_ref(model)
        except ValueError as exc:  # name@abc, name@0: malformed, whatever is registered (400)
            raise InvalidRequest(f"invalid model {model!r}: {exc} (name@N, N >= 1)") from None
        # Well formed but absent is 404 with the resolver's reason; another tenant's name answers
        # exactly what an unregistered name does (the store is read either way), so its reason
        # never says which versions exist.
        name = model.partition("@")[0]
        hidden = record.viewer is not None and not record.viewer.can_see(name)
        try:
            manifest = await asyncio.to_thread(self.resolver.resolve, model)
            absent = not_found(name) if hidden else None
        except AdapterNotFound as exc:
            absent = not_found(name) if hidden else exc
        if absent is not None:
            raise ModelNotFound(f"model {model!r} is not the base model {info.model_id!r}, and {absent}") from None
        record.adapter = manifest.ref
        record.target_label = manifest.name
        return Target(model=model, adapter=manifest)

    def require(self, target: Target, allowed: set[Task], what: str, base_ok: bool, base_task: Task) -> None:
        """UnsupportedTask (400) unless `target` can do `what`."""
        if target.adapter is None:
            if not base_ok:
                raise UnsupportedTask(f"{what} is not available for the base model {target.model!r} ({base_task.value})")
            return
        if target.adapter.task not in allowed:
            raise UnsupportedTask(
                f"{what} is not available for adapter {target.adapter.ref} (task {target.adapter.task.value}); "
                f"it needs one of: {', '.join(sorted(t.value for t in allowed))}"
            )

    def account(self, record: RequestRecord, result: ReplicaResult | StreamItem) -> None:
        """Fold a replica answer's bookkeeping into the record and the metrics."""
        if result.served_by is not None:  # once per request (a stream's first item)
            record.served_by = result.served_by
            self.metrics.replica_requests.labels(result.served_by.replica).inc()
        self.metrics.apply(result.report)
