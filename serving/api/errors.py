"""Errors at the HTTP edge: one error body (docs/http-api.md#errors) for every route.

Both the inference routes (serving.ingress) and the registry routes (serving.api.registry)
use `ErrorMappingRoute`, so validation, auth and service errors, and errors raised inside
a Ray call to a model replica, all answer `{"error": {message, type, code}}` with the
status `serving.errors.status_for` gives, whatever exception handlers the app installs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import Overloaded, TooManyRequests, Unauthorized, error_body, status_for

log = logging.getLogger("capaserve.api")


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
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
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


class ErrorMappingRoute(APIRoute):
    """Route class whose handler (dependencies included) answers every error with the error body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def mapped(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - the API edge: everything becomes a body
                return error_response(exc)

        return mapped
