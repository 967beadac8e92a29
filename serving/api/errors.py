"""Errors at the HTTP edge: one error body (docs/http-api.md#errors) for every route.

Both the inference routes (serving.ingress) and the registry routes (serving.api.registry)
use `ErrorMappingRoute`, so validation, auth and service errors, and errors raised inside
a Ray call to a model replica, all answer `{"error": {message, type, code}}` with the
status `status_for` gives, whatever exception handlers the app installs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adapters.errors import BundleError, validation_message
from adapters.registry.store import AdapterNotFound
from adapters.tasks.errors import (
    AdapterNotLoaded,
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    UnsupportedTask,
)

log = logging.getLogger("capaserve.api")

_STATUS: list[tuple[type[BaseException], int, str]] = [
    (InvalidRequest, 400, "invalid_request_error"),
    (UnsupportedTask, 400, "invalid_request_error"),
    (BundleError, 400, "invalid_adapter"),
    (Unauthorized, 401, "authentication_error"),
    (Forbidden, 403, "permission_error"),
    (ModelNotFound, 404, "not_found_error"),
    (AdapterNotFound, 404, "not_found_error"),
    (AdapterNotLoaded, 404, "not_found_error"),
    (PayloadTooLarge, 413, "payload_too_large"),
    (TooManyRequests, 429, "rate_limit_error"),
    (Overloaded, 503, "overloaded_error"),
    # A model replica was lost while it held the request (killed, crashed, its node gone) and
    # the request could not be retried (serving.ingress.HandleClient): try again.
    (RayActorError, 503, "unavailable"),
    # The client closed the connection while its body was read: nginx's 499, so logs and
    # metrics do not count it as a server error (nobody receives this answer).
    (ClientDisconnect, 499, "client_closed_request"),
]


def status_for(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error type) for a known exception; (500, 'internal_error') otherwise."""
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal_error"


def error_body(message: str, kind: str, code: int) -> dict:
    """The error body of docs/http-api.md#errors: {"error": {"message", "type", "code"}}."""
    return {"error": {"message": message, "type": kind, "code": code}}



def unwrap(exc: BaseException) -> BaseException:
    """The user exception inside a Ray task error; Ray's back-pressure as Overloaded."""
    if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        return exc.cause
    if isinstance(exc, BackPressureError):
        return Overloaded(str(exc))
    return exc


def error_response(exc: BaseException) -> JSONResponse:
    """The error body for any exception; unknown ones are 500 without internals (and logged)."""
    exc = unwrap(exc)
    if isinstance(exc, RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{loc}: {validation_message(err)}" if loc else validation_message(err))
        status, kind, message = 400, "invalid_request_error", "; ".join(parts) or "invalid request"
    elif isinstance(exc, StarletteHTTPException) and exc.status_code < 500:
        # Raised by FastAPI itself inside the route, e.g. a body that is not UTF-8 JSON (400).
        status, message = exc.status_code, str(exc.detail)
        kind = "not_found_error" if status == 404 else "invalid_request_error"
    else:
        status, kind = status_for(exc)
        message = str(exc) if status < 500 else "internal error"
        if status >= 500:
            log.error("request failed", exc_info=exc)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    if isinstance(exc, TooManyRequests):
        headers = {"Retry-After": str(exc.retry_after)}
    return JSONResponse(error_body(message, kind, status), status_code=status, headers=headers)


async def send_closing_error(scope: dict, send: Any, message: str, kind: str, status: int,
                             headers: dict[str, str] | None = None) -> None:
    """The error body sent by an ASGI middleware before any route runs, with `Connection: close`:
    the rest of the request's body is never read, so the connection cannot carry another request."""
    headers = {"connection": "close", **(headers or {})}
    response = JSONResponse(error_body(message, kind, status), status_code=status, headers=headers)
    await response(scope, _no_receive, send)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


def _read_as_json(request: Request) -> str | None:
    """Make FastAPI parse the body as JSON whatever its declared type, as OpenAI's API does
    (`curl -d` sends `application/x-www-form-urlencoded`); returns the type declared, or None
    when it already was JSON. FastAPI reads the type from the scope's headers when it parses."""
    declared = request.headers.get("content-type")
    media = (declared or "").split(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return None
    headers = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"content-type"]
    request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
    request.__dict__.pop("_headers", None)  # Starlette caches the parsed headers
    return declared or "(none)"


#: pydantic's error types for a body that is missing or JSON of another kind than an object
_NOT_AN_OBJECT = frozenset({"missing", "model_attributes_type", "model_type", "dict_type"})


def _body_error(exc: RequestValidationError, declared: str | None) -> InvalidRequest | None:
    """A clear 400 when the body as a whole is not a JSON object: not JSON at all, JSON of
    another kind, or empty; naming the content type sent when it was not JSON's."""
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        sent = f" (received content-type {declared})" if declared else ""
        if err.get("type") == "json_invalid":
            where = f" at character {loc[1]}" if len(loc) > 1 else ""
            return InvalidRequest(f"the request body must be JSON{sent}: it does not parse{where}"
                                  f" ({err.get('ctx', {}).get('error', 'invalid JSON')})")
        if loc == ("body",) and err.get("type") in _NOT_AN_OBJECT:
            what = "is empty" if err.get("type") == "missing" else f"is JSON but not an object ({type(err.get('input')).__name__})"
            return InvalidRequest(f"the request body must be a JSON object{sent}; it {what}")
    return None


class ErrorMappingRoute(APIRoute):
    """Route class whose handler (dependencies included) answers every error with the error body.
    A route with a JSON body model reads the body as JSON whatever its content type."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        json_body = self.body_field is not None and not isinstance(self.body_field.field_info, params.Form)

        async def mapped(request: Request) -> Response:
            declared = _read_as_json(request) if json_body else None
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return error_response(_body_error(exc, declared) or exc)
            except Exception as exc:  # noqa: BLE001 - the API edge: everything becomes a body
                return error_response(exc)

        return mapped
