"""The few exception types a request can fail with, in serving and in training alike. Each
maps to one HTTP status at the API edge (`serving.api.errors.status_for`); the code that
raises them knows nothing of HTTP, Ray or starlette."""

from __future__ import annotations


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
