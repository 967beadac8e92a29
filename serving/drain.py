"""Graceful stop of the ingress: refuse new requests, finish the ones in progress.

`capaserve serve` on SIGTERM (or Ctrl-C) first calls `Ingress.drain(timeout)`: from then on
the ingress answers every new request with 503 `unavailable`, `Connection: close` and
`Retry-After`, before any work (so a client or load balancer retries elsewhere, and
`/readyz` turns 503 at once), while the requests already in progress run to their end,
streams included, with the model replicas still up behind them. Only when none is left,
or `server.drain_timeout_s` has passed, does the command stop Serve and Ray.

Why not Serve's own replica shutdown: it stops every deployment at once (the model
replicas go while the ingress still waits on them), and a direct-ingress replica keeps
accepting new requests until it has none in progress, which under steady load never
comes before its timeout (ray/serve/_private/replica.py, 2.60). `/healthz` and `/metrics`
still answer while draining.
"""

from __future__ import annotations

import asyncio
from typing import Any

from serving.api.errors import send_closing_error

PASS_THROUGH = {"/healthz", "/metrics"}


class DrainGate:
    """Counts the HTTP requests in progress; once draining, lets no new one in."""

    def __init__(self) -> None:
        self.in_progress = 0
        self.draining = False
        self._idle: asyncio.Event | None = None

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests from now on and wait (at most `timeout_s`) until none is in
        progress; returns how many were still in progress at the end (0: all finished)."""
        self.draining = True
        self._idle = self._idle or asyncio.Event()
        if self.in_progress:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.in_progress

    def enter(self) -> None:
        self.in_progress += 1

    def leave(self) -> None:
        self.in_progress -= 1
        if not self.in_progress and self._idle is not None:
            self._idle.set()


class DrainMiddleware:
    """ASGI middleware over a `DrainGate`: while draining, new requests get 503 at once."""

    def __init__(self, app: Any, gate: DrainGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in PASS_THROUGH:
            await self.app(scope, receive, send)
            return
        if self.gate.draining:
            await _refuse(scope, send)
            return
        self.gate.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.leave()


async def _refuse(scope: dict, send: Any) -> None:
    message = "the server is shutting down; retry on another server"
    await send_closing_error(scope, send, message, "unavailable", 503, {"retry-after": "1"})
