"""Which model replica gets a request: adapter affinity, bounded by load.

Serve's default router (power of two choices with `MultiplexMixin`) sends a multiplexed
model id to the replicas that report it loaded for as long as one of them accepts, and a
replica accepts until `max_ongoing_requests` (256 here: the scheduler needs requests
queued to batch them). So whichever replica loaded an adapter first keeps all of its
traffic: a hot adapter never spreads to an idle replica (ray-project/ray#48741), and
after a replica is replaced every adapter stays on the survivors while the new one idles
(README.md has the measurement).

`AdapterAffinityRouter` keeps the affinity (an adapter's requests go where it is loaded:
no load, and batches of one adapter) while that costs no balance, after the rule of
consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, SODA 2018). With
`load` the requests a replica holds (this router's queue-length view: sent and not yet
answered, refreshed from the replica whenever it is probed), `total` their sum over the
`n` replicas and `cap = max(min_load, ceil(load_factor * (total + 1) / n))`:

- a request for an adapter goes to the least loaded replica holding it whose load + 1 is
  within `cap`;
- when every holder is over `cap`, to the least loaded replica that does not hold it,
  which loads it, so from then on the adapter has one more holder to balance over;
- an adapter no replica holds goes, as with Serve, to the replicas holding the fewest
  adapters (the least loaded of them), so adapters are shared out as they come;
- the base model (no multiplexed id): power of two choices over all replicas.

`min_load` (two calls per engine worker: one computing, one queued, what the ingress's
coalescing keeps in flight, `serving.coalesce.CALLS_PER_WORKER`) keeps a lightly loaded
server from loading adapters twice for nothing; `load_factor` (`server.affinity_load_factor`) is how much imbalance affinity may
cost. Later ranks always list every replica, so a request is never stuck on a replica
that refuses it or has died.

Only Serve's public request-router API is used (`ray.serve.request_router`, alpha in Ray
2.60, set through the deployment's `RequestRouterConfig`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import (
    FIFOMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

#: Defaults; `serving.app.build_app` passes the configured values.
DEFAULT_MIN_LOAD = 2
DEFAULT_LOAD_FACTOR = 1.25

R = TypeVar("R")


def load_cap(total: int, replicas: int, min_load: int, load_factor: float) -> int:
    """The most requests a replica may hold and still take an adapter's next one by affinity."""
    return max(min_load, math.ceil(load_factor * (total + 1) / max(1, replicas)))


def affinity_ranks(
    holders: Sequence[R], fewest: Sequence[R], rest: Sequence[R], load: Callable[[R], int],
    min_load: int = DEFAULT_MIN_LOAD, load_factor: float = DEFAULT_LOAD_FACTOR,
) -> list[list[R]]:
    """The ranks of replicas to try, in order, for a request of one adapter: the rule of the
    module docstring, apart from Serve so that it can be driven with plain data.

    `holders` hold the adapter, `fewest` hold the fewest adapters of the others and `rest`
    are the remaining replicas (Serve's `rank_replicas_via_multiplex`); `load(r)` is the
    requests replica r holds. Every replica appears in some rank; empty ranks are left out.
    """

    def by_load(replicas: Sequence[R]) -> list[R]:
        return sorted(replicas, key=load)

    if not holders:  # a first load: where the fewest adapters are, then anywhere
        return [ranked for ranked in (by_load(fewest), by_load(rest)) if ranked]
    everyone = [*holders, *fewest, *rest]
    cap = load_cap(sum(load(r) for r in everyone), len(everyone), min_load, load_factor)
    within = [r for r in holders if load(r) + 1 <= cap]
    others = by_load([*fewest, *rest])
    if within:
        ranks = [by_load(within), others, by_load([r for r in holders if r not in within])]
    else:  # every holder is over its bound: one more replica loads the adapter
        ranks = [others[:1], by_load(holders), others[1:]]
    return [ranked for ranked in ranks if ranked]


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Adapter affinity bounded by load (see the module docstring)."""

    def initialize_state(self, min_load: int = DEFAULT_MIN_LOAD, load_factor: float = DEFAULT_LOAD_FACTOR, **_: object) -> None:
        self.min_load = min_load
        self.load_factor = load_factor

    def _load(self, replica: RunningReplica) -> int:
        """Requests the replica holds as this router knows them (unknown: 0, so it is tried and probed)."""
        queued = self.replica_queue_len_cache.get(replica.replica_id)
        return 0 if queued is None else queued

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Back off between rounds in which every replica refused (full queues), as Serve's
            # multiplexed routing does, instead of asking again at once.
            pending_request.routing_context.should_backoff = True
        model = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not model:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        holders, fewest, rest = self.rank_replicas_via_multiplex(candidate_replicas, model)
        load = {r.replica_id: self._load(r) for r in candidate_replicas}
        return affinity_ranks(holders, fewest, rest, lambda r: load[r.replica_id], self.min_load, self.load_factor)


def router_config(min_load: int, load_factor: float) -> RequestRouterConfig:
    """The model deployment's `request_router_config` (serving.app.build_app)."""
    return RequestRouterConfig(
        request_router_class=AdapterAffinityRouter,
        request_router_kwargs={"min_load": min_load, "load_factor": load_factor},
    )
