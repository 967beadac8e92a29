"""Whether the adapter registry answers from this process: part of readiness (`GET /readyz`).

A registry the replicas could not reach (no credentials on a joined cluster) made every
adapter request a 500 while `/readyz` said 200 and the log said nothing. The ingress and
every model replica each hold a `RegistryProbe`; readiness fails while either side's probe
does, and each side logs the reason when it changes (never on every probe, which a load
balancer may send every second).
"""

from __future__ import annotations

import asyncio
import logging
import time

from adapters.registry.store import RegistryStore

log = logging.getLogger("capaserve.registry")


class RegistryProbe:
    """`store.probe()` from a worker thread: one at a time, its outcome reused for `every_s`,
    awaited at most `timeout_s` (a probe still running then counts as a failure)."""

    def __init__(self, store: RegistryStore, where: str, *, timeout_s: float = 3.0, every_s: float = 2.0) -> None:
        self.store = store
        self.where = where
        self.timeout_s = timeout_s
        self.every_s = every_s
        self._task: asyncio.Future[None] | None = None
        self._started = 0.0
        self._logged: str | None = None

    async def error(self) -> str | None:
        """None while the registry answers, else why not (one line, no secrets: boto3 never puts them in messages)."""
        now = time.monotonic()
        if self._task is None or (self._task.done() and now - self._started >= self.every_s):
            self._task = asyncio.ensure_future(asyncio.to_thread(self.store.probe))
            self._started = now
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self.timeout_s)
            reason = None
        except TimeoutError:
            reason = f"no answer within {self.timeout_s:g} s"
        except Exception as exc:  # noqa: BLE001 - any failure is the reason
            reason = f"{type(exc).__name__}: {exc}"
        if reason != self._logged:
            if reason is None:
                log.info("adapter registry %r answers again from %s", self.store, self.where)
            else:
                log.warning("adapter registry %r unreachable from %s: %s", self.store, self.where, reason)
            self._logged = reason
        return reason
