"""The few exception types of the serving layer, each mapped to one HTTP status at the API
edge (`serving.errors.status_for`). Engine code raises these; only routes build responses."""

from __future__ import annotations

from ray.exceptions import RayActorError
from starlette.requests import ClientDisconnect

from adapters.errors import BundleError
from adapters.registry.store import AdapterNotFound


class InvalidRequest(ValueError):
    """The request is malformed or asks for something out of range (400)."""


class UnsupportedTask(ValueError):
    """The model cannot do what the endpoint asks, e.g. chat on an encoder (400)."""


class ModelNotFound(LookupError):
    """`model` names neither the base model nor a known adapter (404)."""


class Unauthorized(PermissionError):
    """No credentials were sent where they are required (401)."""


class Forbidden(PermissionError):
    """Credentials were sent but are wrong (403)."""


class PayloadTooLarge(ValueError):
    """An upload exceeds the configured size limit (413)."""


class AdapterNotLoaded(KeyError):
    """A request names an adapter this engine has not loaded (or has evicted): load it first (404)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(name)

    def __str__(self) -> str:  # KeyError would quote the repr of the whole message
        return f"adapter {self.name!r} is not loaded on this engine"


class TooManyRequests(RuntimeError):
    """A tenant is over its quota (429 with `Retry-After: retry_after`)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(RuntimeError):
    """The replica's queue is full; retry later (503)."""


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
