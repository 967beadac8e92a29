"""The request-body limit of the inference routes (docs/http-api.md#limits): 413 before the body is read.

Without it a route read whatever it was sent: a 300 MB body was parsed whole and the
ingress kept hundreds of MB afterwards. `BodyLimit` answers 413 with the error body:

* at once when `Content-Length` is over the limit: the body is never read, so the answer
  takes no longer than for an empty request, and a client that sent `Expect: 100-continue`
  (curl does above 1 MiB) never sends it;
* while the body streams in (chunked, or a `Content-Length` that lies), as soon as the
  bytes received pass the limit; what the route answered meanwhile is dropped.

Adapter uploads are exempt: they stream to disk under their own, larger limit
(`max_upload_bytes`, serving/api/registry.py).
"""

from __future__ import annotations

import traceback
from typing import Any

from adapters.tasks.errors import PayloadTooLarge
from serving.api.errors import send_closing_error

#: (method, path prefix) of the routes that take bundle bytes under the upload limit instead.
UPLOAD_ROUTES = (("PUT", "/v1/adapters/"), ("POST", "/v1/adapters"))


def _exempt(scope: dict) -> bool:
    method, path = scope.get("method", ""), scope.get("path", "")
    return any(method == m and (path == p or path.startswith(p)) for m, p in UPLOAD_ROUTES)


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses such a request before it gets here
    return None


class BodyLimit:
    """ASGI middleware: an inference request body over `limit` bytes is answered 413 (see module doc)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or _exempt(scope):
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.limit:
            await _refuse(scope, send, f"request body of {length} bytes exceeds the limit of {self.limit} bytes")
            return
        received = 0
        exceeded: PayloadTooLarge | None = None
        started = False

        async def counting_receive() -> dict:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = PayloadTooLarge(f"request body exceeds the limit of {self.limit} bytes")
                    raise exceeded
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the route's answer to a body it never got whole: ours goes instead
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except PayloadTooLarge:
            if started:
                raise
        finally:
            if exceeded is not None:
                # The frames the error went through hold the body read so far (up to the limit) in
                # reference cycles that only the cyclic GC frees, which may not run for many requests:
                # three refusals kept ~93 MiB. Clearing the finished frames frees it now.
                traceback.clear_frames(exceeded.__traceback__)
        if exceeded is not None and not started:
            await _refuse(scope, send, f"request body exceeds the limit of {self.limit} bytes")


async def _refuse(scope: dict, send: Any, message: str) -> None:
    await send_closing_error(scope, send, message, "payload_too_large", 413)
