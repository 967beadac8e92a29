"""Per-tenant request quotas at the ingress: requests in progress and requests per second.

A request made with a key of a tenant takes one of its tenant's concurrent slots and one token
of its tenant's bucket (refilled at `requests_per_s`, holding at most max(1, requests_per_s)
tokens, so a tenant may burst one second's worth). Beyond either it is refused before any
work with `TooManyRequests` (429 and `Retry-After`: the seconds until a token is back, or 1
for a full set of slots). The slot is given back when the response's last byte is sent
(`serving.ingress.Metered` calls the release). Keys of no tenant (the admin token, `--api-keys`)
have no quota. The counts are per ingress replica: with N ingress replicas a tenant gets up
to N times the limits.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from adapters.tasks.errors import TooManyRequests


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    in_flight: int = 0


class TenantQuotas:
    """Admission per tenant; `admit(tenant)` returns the release to call when the request ends."""

    def __init__(self, max_concurrent: int | None, requests_per_s: float | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_concurrent = max_concurrent
        self.rate = requests_per_s
        self.burst = max(1.0, requests_per_s) if requests_per_s else 0.0
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.max_concurrent) or bool(self.rate)

    def admit(self, tenant: str) -> Callable[[], None]:
        """Take a slot and a token of `tenant`, or raise TooManyRequests."""
        with self._lock:
            now = self.clock()
            b = self._buckets.setdefault(tenant, _Bucket(tokens=self.burst, stamp=now))
            if self.rate:
                b.tokens = min(self.burst, b.tokens + (now - b.stamp) * self.rate)
                b.stamp = now
                if b.tokens < 1.0:
                    wait = math.ceil((1.0 - b.tokens) / self.rate)
                    raise TooManyRequests(f"tenant {tenant!r} is over its {self.rate:g} requests/s", retry_after=wait)
            if self.max_concurrent and b.in_flight >= self.max_concurrent:
                raise TooManyRequests(
                    f"tenant {tenant!r} has {self.max_concurrent} requests in progress, its limit", retry_after=1
                )
            if self.rate:
                b.tokens -= 1.0
            b.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    b.in_flight -= 1

        return release
