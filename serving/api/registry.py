"""The adapter registry over HTTP (docs/http-api.md#adapter-registry), plus vLLM's runtime LoRA admin routes.

Contract with the ingress (serving/app.py):

    app.include_router(build_registry_router(store, settings, base_spec, on_change))

* `store` is the RegistryStore every replica's AdapterResolver reads.
* `base_spec()` returns the BaseModelSpec of the served base (fetched once from the model
  deployment and cached by the ingress); every upload is checked against it before it is
  committed, so the registry only ever holds adapters this server can serve.
* `on_change(name)` is awaited after every commit or delete of `name`, to tell replicas
  to drop what they cached for it. It is advisory: resolvers list versions on each
  request, so a new version is served and a deleted one answers 404 even if it fails
  (its failure is logged; the registry write has happened and the answer says so).
* The router carries its own route class, so its errors (including auth and
  parameter-validation errors) are the error body (docs/http-api.md#errors) `{"error": {message, type, code}}`
  whatever exception handlers the app installs.

Uploads are streamed to a temp file (never held whole in memory while receiving), with
the size limit checked on Content-Length before reading and on every chunk while
reading (413). The file is then fully validated (format, layout, NaN/Inf, then
servability on the base) and only then committed; any failure leaves the store as it
was. A client may send the sha256 it expects (`X-Content-SHA256` header, or the `sha256`
form field) to guard against corruption in transit.

Auth: writes (PUT, POST, DELETE, load/unload) need the admin token when one is set;
reads (list, get, download) need an API key (or the admin token) when keys are set,
since a download hands out trained weights.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from adapters.bundle import AdapterBundle, Task, save_bundle
from adapters.importers.peft import import_peft
from adapters.manifest import NAME_PATTERN, TENANT_PATTERN, AdapterManifest, is_valid_name
from adapters.registry import audit
from adapters.registry.keys import CreatedKey, KeyInfo, KeyStore, Role
from adapters.registry.store import AdapterNotFound, RegistryStore, not_found, verified_chunks
from adapters.tasks.errors import Forbidden, InvalidRequest, PayloadTooLarge
from adapters.validation import BaseModelSpec, check_servable, load_bundle
from serving.api.auth import AuthSettings, Principal
from serving.api.errors import ErrorMappingRoute
from serving.api.spool import Spool, sweep_stale
from serving.protocol import ERROR_RESPONSES

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: Room for multipart boundaries and the small text fields around the file part.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
#: Largest text form field (`name`, `sha256`) accepted in a multipart upload.
MAX_FORM_FIELD_BYTES = 1024


# -- settings and bodies ---------------------------------------------------------------


class RegistrySettings(BaseModel):
    """Limits and auth of the registry routes."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    max_upload_bytes: int = Field(256 * MiB, ge=1, description="Largest bundle accepted, in bytes (413 beyond).")
    tmp_dir: Path | None = Field(
        None,
        description="Where uploads are spooled while validated; None: capaserve's folder in the system temp "
        "folder (serving/api/spool.py). Leftovers of a killed server are removed when the router is built.",
    )
    max_concurrent_validations: int = Field(
        2, ge=1, description="Uploads validated at once; each holds its bundle in memory while checked."
    )
    allowed_paths: list[Path] = Field(
        default_factory=list,
        description="Folders under which POST /v1/load_lora_adapter may read `lora_path`; empty: none.",
    )
    auth: AuthSettings = Field(default_factory=AuthSettings, description="Admin token and API keys.")


class AdapterList(BaseModel):
    """GET /v1/adapters: the latest manifest of every adapter."""

    object: str = "list"
    data: list[AdapterManifest]


class AdapterDetail(AdapterManifest):
    """GET /v1/adapters/{name}: the latest manifest plus every live version number."""

    versions: list[int] = Field(..., description="Live versions of this name, ascending.")


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body (unknown fields such as lora_int_id are ignored)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(..., description="Adapter name to register under.")
    lora_path: str = Field(..., description="A capaboost.v1 bundle file or a PEFT LoRA folder on the server.")


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter body."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(..., description="Adapter name; every version is deleted.")


class UnloadLoraAdapterResponse(BaseModel):
    object: str = "lora_adapter.unloaded"
    name: str
    deleted_versions: list[int]


# -- OpenAPI documentation of the bodies FastAPI does not parse itself -------------------

BINARY = {"type": "string", "format": "binary"}
#: PUT /v1/adapters/{name}: the raw bundle bytes.
RAW_BUNDLE_BODY = {
    "requestBody": {
        "required": True,
        "description": "The bundle file's bytes (capaboost.v1 safetensors).",
        "content": {"application/octet-stream": {"schema": BINARY}},
    }
}
#: POST /v1/adapters: multipart form fields `file`, `name` and optional `sha256`.
MULTIPART_BUNDLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "name"],
                    "properties": {
                        "file": {**BINARY, "description": "The bundle file."},
                        "name": {"type": "string", "pattern": NAME_PATTERN, "description": "Adapter name."},
                        "sha256": {"type": "string", "description": "Expected sha256 of the file (hex)."},
                    },
                }
            }
        },
    }
}
BUNDLE_DOWNLOAD = {200: {"description": "The bundle bytes.", "content": {"application/octet-stream": {"schema": BINARY}}}}


# -- upload spooling -------------------------------------------------------------------


def _check_content_length(request: Request, limit: int) -> None:
    raw = request.headers.get("content-length")
    if raw is None:
        return
    try:
        length = int(raw)
    except ValueError:
        raise InvalidRequest(f"malformed Content-Length {raw!r}") from None
    if length > limit:
        raise PayloadTooLarge(f"upload of {length} bytes exceeds the limit of {limit} bytes")


async def _spool_raw(request: Request, settings: RegistrySettings) -> Spool:
    _check_content_length(request, settings.max_upload_bytes)
    spool = Spool(settings.tmp_dir, settings.max_upload_bytes)
    try:
        async for chunk in request.stream():
            spool.write(chunk)
        spool.close()
    except BaseException:
        spool.discard()
        raise
    return spool


async def _spool_multipart(request: Request, settings: RegistrySettings) -> tuple[Spool, dict[str, str]]:
    """Stream a multipart body: the `file` part into a spool, small text fields into a dict."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidRequest("POST /v1/adapters takes multipart/form-data with fields 'file' and 'name'")
    _check_content_length(request, settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES)

    spool = Spool(settings.tmp_dir, settings.max_upload_bytes)
    fields: dict[str, str] = {}
    state: dict[str, Any] = {"headers": {}, "field": b"", "value": b"", "part": None, "buf": bytearray()}
    seen_file = False

    def on_part_begin() -> None:
        state.update(headers={}, field=b"", value=b"", part=None, buf=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        nonlocal seen_file
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        part = disp.get(b"name", b"").decode("utf-8", "replace")
        if part == "file":
            if seen_file:
                raise InvalidRequest("multipart body has more than one 'file' part")
            seen_file = True
        state["part"] = part

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["part"] == "file":
            spool.write(data[start:end])
        else:
            state["buf"] += data[start:end]
            if len(state["buf"]) > MAX_FORM_FIELD_BYTES:
                raise InvalidRequest(f"form field {state['part']!r} is longer than {MAX_FORM_FIELD_BYTES} bytes")

    def on_part_end() -> None:
        if state["part"] and state["part"] != "file":
            fields[state["part"]] = bytes(state["buf"]).decode("utf-8", "replace")

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES:
                raise PayloadTooLarge(f"upload exceeds the limit of {settings.max_upload_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
        spool.close()
        if not seen_file:
            raise InvalidRequest("multipart body has no 'file' part")
    except MultipartParseError as exc:
        spool.discard()
        raise InvalidRequest(f"malformed multipart body: {exc}") from None
    except BaseException:
        spool.discard()
        raise
    return spool, fields


# -- the router ------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if not is_valid_name(name):
        shown = name if len(name) <= 140 else name[:137] + "..."
        raise InvalidRequest(f"invalid adapter name {shown!r}: names must match {NAME_PATTERN} (ASCII)")
    return name


def _manifest_json(m: BaseModel) -> dict[str, Any]:
    return m.model_dump(mode="json")


def build_registry_router(
    store: RegistryStore,
    settings: RegistrySettings,
    base_spec: Callable[[], Awaitable[BaseModelSpec]],
    on_change: Callable[[str], Awaitable[None]] | None = None,
) -> APIRouter:
    """The registry routes over `store`; see the module docstring for the contract."""
    sweep_stale(settings.tmp_dir)  # spool files of uploads a killed server left behind
    router = APIRouter(route_class=ErrorMappingRoute, tags=["adapters"], responses=ERROR_RESPONSES)
    auth = settings.auth
    validations = asyncio.Semaphore(settings.max_concurrent_validations)

    async def notify(name: str) -> None:
        if on_change is None:
            return
        try:
            await on_change(name)
        except Exception:  # noqa: BLE001 - advisory; resolvers re-list on every request anyway
            log.warning("on_change(%r) failed; replicas will still see the change on their next lookup", name,
                        exc_info=True)

    def record(who: Principal, action: audit.Action, name: str, version: int | None = None,
               sha256: str | None = None) -> None:
        audit.append(store, audit.AuditEntry(key_id=who.key_id, tenant=who.tenant, action=action, name=name,
                                             version=version, sha256=sha256))

    def may_write(who: Principal, name: str) -> str:
        """`name`, valid and writable by `who` (403 otherwise, whether or not it exists)."""
        _check_name(name)
        if not who.can_write(name):
            own = f"names under '{who.tenant}/'" if who.role is Role.writer and who.tenant else "no adapter names"
            raise Forbidden(f"this key may write {own}")
        return name

    async def visible(who: Principal, name: str, version: int | None = None) -> AdapterManifest:
        """The manifest of `name@version` if `who` may see it; else the error of an unknown name
        (same body, and the store is asked either way so the timing is the same)."""
        try:
            manifest = await run_in_threadpool(store.get, name, version)
        except AdapterNotFound:
            raise not_found(name, version) from None
        if not who.can_see(name):
            raise not_found(name, version)
        return manifest

    async def commit_file(
        who: Principal, name: str, path: Path, expected_sha256: str | None, actual_sha256: str | None
    ) -> JSONResponse:
        """Validate a spooled bundle against the base, then commit it. The caller removes `path`."""
        if expected_sha256 is not None and actual_sha256 is not None:
            if expected_sha256.strip().lower() != actual_sha256:
                raise InvalidRequest(
                    f"sha256 mismatch: the client sent {expected_sha256.strip()!r}, the body hashes to {actual_sha256!r}"
                )
        async with validations:
            bundle = await run_in_threadpool(load_bundle, path)
            check_servable(bundle, await base_spec())
            manifest = await run_in_threadpool(store.commit, name, path, bundle.metadata)
        log.info("registered adapter %s (sha256 %s, %d bytes)", manifest.ref, manifest.sha256, manifest.size_bytes)
        record(who, "adapter.upload", name, manifest.version, manifest.sha256)
        await notify(name)
        return JSONResponse(_manifest_json(manifest), status_code=201)

    @router.put(
        "/v1/adapters/{name:path}", status_code=201, response_model=AdapterManifest, openapi_extra=RAW_BUNDLE_BODY,
    )
    async def put_adapter(
        name: str, request: Request, x_content_sha256: str | None = Header(None), who: Principal = Depends(auth.writer)
    ) -> JSONResponse:
        """Upload a bundle (raw body) as the next version of `name`."""
        may_write(who, name)
        spool = await _spool_raw(request, settings)
        try:
            return await commit_file(who, name, spool.path, x_content_sha256, spool.hash.hexdigest())
        finally:
            spool.discard()

    @router.post(
        "/v1/adapters", status_code=201, response_model=AdapterManifest, openapi_extra=MULTIPART_BUNDLE_BODY,
    )
    async def post_adapter(
        request: Request, x_content_sha256: str | None = Header(None), who: Principal = Depends(auth.writer)
    ) -> JSONResponse:
        """Upload a bundle as multipart form fields `file` and `name` (and optional `sha256`)."""
        spool, fields = await _spool_multipart(request, settings)
        try:
            if "name" not in fields:
                raise InvalidRequest("multipart body has no 'name' field")
            name = may_write(who, fields["name"])
            expected = fields.get("sha256") or x_content_sha256
            return await commit_file(who, name, spool.path, expected, spool.hash.hexdigest())
        finally:
            spool.discard()

    @router.get("/v1/adapters", response_model=AdapterList)
    async def list_adapters(who: Principal = Depends(auth.reader)) -> AdapterList:
        """The latest manifest of every name the caller may see."""
        return AdapterList(data=[m for m in await run_in_threadpool(store.list_latest) if who.can_see(m.name)])

    @router.get("/v1/adapters/{name:path}/download", response_class=Response, responses=BUNDLE_DOWNLOAD)
    async def download_adapter(
        name: str, version: int | None = Query(None, ge=1), who: Principal = Depends(auth.reader)
    ) -> Response:
        """The bundle bytes of `name@version` (default: latest), streamed in 1 MiB chunks.

        Never one big body: an 80 MB bundle as one message exceeded gRPC's limit between
        Serve's proxy and the ingress, and held the whole file in memory. The bytes are
        hashed on the way; a blob that does not match its manifest cuts the response short
        (the client sees fewer bytes than Content-Length) and is logged.
        """
        _check_name(name)
        manifest = await visible(who, name, version)
        chunks = await run_in_threadpool(store.stream_blob, manifest.sha256)
        return StreamingResponse(
            verified_chunks(chunks, manifest.sha256, manifest.size_bytes),
            media_type="application/octet-stream",
            headers={
                "Content-Length": str(manifest.size_bytes),
                "Content-Disposition": f'attachment; filename="{manifest.name}-v{manifest.version}.safetensors"',
                "X-Content-SHA256": manifest.sha256,
                "ETag": f'"{manifest.sha256}"',
                "X-Adapter-Version": str(manifest.version),
            },
        )

    @router.get("/v1/adapters/{name:path}", response_model=AdapterDetail)
    async def get_adapter(name: str, who: Principal = Depends(auth.reader)) -> AdapterDetail:
        _check_name(name)
        versions = await run_in_threadpool(store.versions, name)
        if not versions or not who.can_see(name):
            raise not_found(name)
        latest = versions[-1]
        return AdapterDetail(**latest.model_dump(), versions=[m.version for m in versions])

    @router.delete("/v1/adapters/{name:path}", status_code=204)
    async def delete_adapter(
        name: str, version: int | None = Query(None, ge=1), who: Principal = Depends(auth.writer)
    ) -> Response:
        """Delete one version, or every version of `name` (204); 404 if nothing matched."""
        may_write(who, name)
        deleted = await run_in_threadpool(store.delete, name, version)
        log.info("deleted adapter versions %s", [m.ref for m in deleted])
        for m in deleted:
            record(who, "adapter.delete", name, m.version, m.sha256)
        await notify(name)
        return Response(status_code=204)

    # -- vLLM runtime LoRA compatibility ---------------------------------------------

    @router.post("/v1/load_lora_adapter", response_model=AdapterManifest)
    async def load_lora_adapter(
        body: LoadLoraAdapterRequest = Body(...), who: Principal = Depends(auth.admin)
    ) -> JSONResponse:
        """Register a bundle file or a PEFT LoRA folder that is on the server's filesystem.

        Like vLLM, a PEFT folder is accepted if its shapes fit the served base (its
        `base_model_name_or_path` is often a local path, so the base id is not compared).
        Loading an existing name adds a new version. Answers 200 and the manifest.
        """
        name = _check_name(body.lora_name)
        path, kind = _local_source(_allowed(body.lora_path, settings.allowed_paths))
        if kind == "dir":
            spec = await base_spec()
            bundle = await run_in_threadpool(_import_peft_folder, path, spec)
            response = await _commit_bundle(who, name, bundle)
        elif kind == "file":
            size = path.stat().st_size
            if size > settings.max_upload_bytes:
                raise PayloadTooLarge(f"{size}-byte bundle exceeds the limit of {settings.max_upload_bytes} bytes")
            response = await commit_file(who, name, path, None, None)
        else:
            shown = body.lora_path if len(body.lora_path) <= 140 else body.lora_path[:137] + "..."
            raise InvalidRequest(f"lora_path {shown!r} is neither a bundle file nor a folder on the server")
        response.status_code = 200
        return response

    async def _commit_bundle(who: Principal, name: str, bundle: AdapterBundle) -> JSONResponse:
        spool = Spool(settings.tmp_dir, settings.max_upload_bytes, prefix="import-")
        try:
            await run_in_threadpool(save_bundle, bundle, spool.path)  # same file: the lock stays
            return await commit_file(who, name, spool.path, None, None)
        finally:
            spool.discard()

    @router.post("/v1/unload_lora_adapter", response_model=UnloadLoraAdapterResponse)
    async def unload_lora_adapter(
        body: UnloadLoraAdapterRequest = Body(...), who: Principal = Depends(auth.admin)
    ) -> UnloadLoraAdapterResponse:
        """Delete every version of `lora_name` (vLLM's unload); 404 if it is unknown."""
        name = _check_name(body.lora_name)
        deleted = await run_in_threadpool(store.delete, name, None)
        for m in deleted:
            record(who, "adapter.delete", name, m.version, m.sha256)
        await notify(name)
        return UnloadLoraAdapterResponse(name=name, deleted_versions=[m.version for m in deleted])

    # -- keys --------------------------------------------------------------------------

    keys = auth.keys

    @router.post("/v1/keys", status_code=201, response_model=CreatedKey, tags=["keys"])
    async def create_key(body: NewKey, who: Principal = Depends(auth.admin)) -> JSONResponse:
        """A new key; the answer is the only place its secret is ever shown."""
        created = await run_in_threadpool(_key_store().create, body.tenant, body.role, body.name)
        record(who, "key.create", created.id)
        return JSONResponse(created.model_dump(mode="json"), status_code=201)

    @router.get("/v1/keys", response_model=KeyList, tags=["keys"])
    async def list_keys(who: Principal = Depends(auth.admin)) -> KeyList:
        return KeyList(data=[r.info() for r in await run_in_threadpool(_key_store().list)])

    @router.delete("/v1/keys/{key_id}", status_code=204, tags=["keys"])
    async def revoke_key(key_id: str, who: Principal = Depends(auth.admin)) -> Response:
        """Revoke a key: refused on every replica within a second (404 for an unknown id)."""
        if await run_in_threadpool(_key_store().revoke, key_id) is None:
            raise KeyNotFound(f"key {key_id!r} not found")
        record(who, "key.revoke", key_id)
        return Response(status_code=204)

    def _key_store() -> KeyStore:
        if keys is None:
            raise InvalidRequest("this server keeps no keys")
        return keys

    return router


class KeyNotFound(AdapterNotFound):
    """DELETE /v1/keys/{id} of an id that is not there (404)."""


class NewKey(BaseModel):
    """POST /v1/keys."""

    model_config = ConfigDict(extra="forbid")

    tenant: str | None = Field(
        ..., pattern=TENANT_PATTERN, description="The key's tenant; null: a key of no tenant (shared names only)."
    )
    role: Role
    name: str | None = Field(None, max_length=200, description="A label for people.")


class KeyList(BaseModel):
    """GET /v1/keys: every key, never its secret."""

    object: str = "list"
    data: list[KeyInfo]


#: The one answer for a `lora_path` outside the allowed folders: it says nothing of the file.
PATH_NOT_ALLOWED = (
    "lora_path is not under a folder this server allows adapters to be loaded from (setting allowed-lora-paths); "
    "upload the bundle with PUT /v1/adapters/{name} instead"
)


def _allowed(lora_path: str, allowed: list[Path]) -> str:
    """`lora_path` with links and `..` resolved, if it lies under one of the `allowed` folders
    (resolved the same way); otherwise the fixed 400, before the file is looked at, so neither a
    leaked admin key nor the error text reveals anything of files elsewhere (the size and first
    bytes of /etc/shadow did)."""
    try:
        real = Path(os.path.realpath(Path(lora_path).expanduser()))
        if any(real.is_relative_to(os.path.realpath(folder)) for folder in allowed):
            return str(real)
    except (OSError, RuntimeError, ValueError):
        pass
    raise InvalidRequest(PATH_NOT_ALLOWED)


def _local_source(lora_path: str) -> tuple[Path, str | None]:
    """`lora_path` resolved on the server, and "dir", "file" or None (nothing readable there).

    A path that cannot even be looked at (`~nosuchuser`, a name longer than the OS takes, a
    file this process may not read) is the client's error (400), not the server's.
    """
    try:
        path = Path(lora_path).expanduser()
        if path.is_dir():
            return path, "dir"
        if path.is_file():
            if not os.access(path, os.R_OK):
                raise InvalidRequest(f"lora_path {lora_path!r} is not readable by the server")
            with path.open("rb") as f:
                f.read(1)  # some files (e.g. under /proc) only fail when read
            return path, "file"
    except (OSError, RuntimeError, ValueError) as exc:
        if isinstance(exc, InvalidRequest):
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        shown = lora_path if len(lora_path) <= 140 else lora_path[:137] + "..."
        raise InvalidRequest(f"lora_path {shown!r} cannot be read on the server: {reason}") from None
    return path, None


def _import_peft_folder(path: Path, spec: BaseModelSpec) -> AdapterBundle:
    """A PEFT LoRA folder as a bundle for `spec`'s base. Its task is PEFT's task_type, else
    what its saved head is (classifier, qa_outputs), else the served base's own. Stored as
    `capaserve pack` stores it: a seed bundle (a LoRA's all-true masks take no bytes)."""
    fallback = Task.CAUSAL_LM if spec.task is Task.CAUSAL_LM else Task.FEATURE_EXTRACTION
    return import_peft(path, base_model=spec.model_id, fallback_task=fallback).compact()


__all__ = [
    "AdapterDetail",
    "AdapterList",
    "LoadLoraAdapterRequest",
    "RegistrySettings",
    "UnloadLoraAdapterRequest",
    "UnloadLoraAdapterResponse",
    "build_registry_router",
]
