"""Coalescing at the ingress: concurrent encoder requests become one replica call.

Every call from the ingress to a model replica is a Ray Serve request: routing, a gRPC
message each way, (de)serialisation and a scheduler entry on the replica. For a one-text
embeddings request that plumbing costs more CPU than the text's share of a batched forward,
so the ingress joins what arrives together before it crosses to the replica.

The rule keeps an idle server's latency: a call goes out at once while fewer than
`max_inflight` calls of its lane are on their way. Beyond that it waits, and when one of
the lane's calls returns, everything waiting (up to `max_texts` inputs) goes out as one
call, so the replica receives batches of the size the load makes. Nothing waits on a timer.
The ingress keeps `CALLS_PER_WORKER` (two) calls in flight per engine worker of each model
replica: one computing and one queued behind it, so a worker never waits a round trip for
its next call, and the replica's scheduler sees enough requests to group by adapter.

A lane is a method (`embed`, `classify`, `question_answering`) and, while Serve has a routing choice to make, an
adapter version: `serve.multiplexed` routes each adapter to the replicas holding it, so
only requests of one adapter may share a call. With `join_adapters` (a deployment of one
replica, where every call lands on the same replica anyway) a lane is the method alone,
and a joined call carries one part per adapter: many adapters under light per-adapter load
(Zipf traffic over 50 adapters) still cost one Ray call per batch, not one per request.
The replica answers each part as if it had come alone (`ModelServer.call_many`); the
scheduler there groups, merges or mixes them as usual.

Joining changes nothing a client can see: rows of an encoder batch are independent (the
engine's equivalence tests), each part carries one adapter version, and each request gets
its own slice of its part's outputs and token counts. A part's batch bookkeeping
(`served_by`) is shared by its requests; its metric report (counts since the previous
report) goes with the first of them only, so nothing is counted twice. A failed part fails
each of its requests with that error, and no other part's. Generation is never joined: its
requests differ in sampling parameters and are streamed.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from adapters.tasks.kinds import ENCODER_KINDS
from serving.replica_io import ReplicaCall, ReplicaInfo, ReplicaResult, StreamItem
from serving.service import ModelClient

#: Joined calls the ingress keeps in flight per engine worker of a model replica (its lanes'
#: `max_inflight`), the calls in flight Serve's autoscaling targets per worker, and the load
#: under which adapter affinity never spreads (serving/app.py): one computing, one queued. One
#: per worker gave bigger, cheaper forwards at one text a request but no more requests/s, and
#: fewer with many adapters (loadtest/results/overheads.md).
CALLS_PER_WORKER = 2

#: Replica methods whose rows are independent, so their requests may share a call (a question
#: is decoded from its own windows only, and images are checked by the ingress before joining).
JOINABLE = frozenset(kind.method for kind in ENCODER_KINDS)


@dataclass
class _Waiting:
    call: ReplicaCall
    future: asyncio.Future[ReplicaResult]


@dataclass
class _Lane:
    inflight: int = 0
    waiting: deque[_Waiting] = field(default_factory=deque)


LaneKey = tuple[str, str | None]


class CoalescingClient:
    """A `ModelClient` that joins concurrent encoder calls (`JOINABLE`) of one lane."""

    def __init__(self, inner: ModelClient, max_inflight: int = 2, max_texts: int = 32, join_adapters: bool = False) -> None:
        self.inner = inner
        self.max_inflight = max(1, max_inflight)
        self.max_texts = max(1, max_texts)
        self.join_adapters = join_adapters
        self._lanes: dict[LaneKey, _Lane] = defaultdict(_Lane)
        #: replica calls sent and the requests they carried (tests and operators read these)
        self.calls_sent = 0
        self.requests_joined = 0

    async def call(self, method: str, call: ReplicaCall) -> ReplicaResult:
        if method not in JOINABLE or len(call.inputs()) >= self.max_texts:
            self.calls_sent += 1
            self.requests_joined += 1
            return await self.inner.call(method, call)
        key = (method, None if self.join_adapters else call.ref)
        lane = self._lanes[key]
        if lane.inflight < self.max_inflight and not lane.waiting:
            return await self._send_one(key, lane, call)
        waiting = _Waiting(call, asyncio.get_running_loop().create_future())
        lane.waiting.append(waiting)
        return await waiting.future

    async def _send_one(self, key: LaneKey, lane: _Lane, call: ReplicaCall) -> ReplicaResult:
        lane.inflight += 1
        self.calls_sent += 1
        self.requests_joined += 1
        try:
            return await self.inner.call(key[0], call)
        finally:
            self._release(key, lane)

    def _release(self, key: LaneKey, lane: _Lane) -> None:
        lane.inflight -= 1
        while lane.waiting and lane.inflight < self.max_inflight:
            group = self._take(lane)
            lane.inflight += 1
            asyncio.get_running_loop().create_task(self._send_group(key, lane, group))
        if not lane.inflight and not lane.waiting:
            self._lanes.pop(key, None)

    def _take(self, lane: _Lane) -> list[_Waiting]:
        """The longest run of waiting requests (oldest first) whose texts fit `max_texts`."""
        group: list[_Waiting] = []
        texts = 0
        while lane.waiting and (not group or texts + len(lane.waiting[0].call.inputs()) <= self.max_texts):
            w = lane.waiting.popleft()
            if w.future.done():  # its client went away: nothing to compute
                continue
            group.append(w)
            texts += len(w.call.inputs())
        return group

    async def _send_group(self, key: LaneKey, lane: _Lane, group: list[_Waiting]) -> None:
        try:
            if not group:
                return
            parts: dict[str | None, list[_Waiting]] = {}
            for w in group:  # one part per adapter version, in order of first arrival
                parts.setdefault(w.call.ref, []).append(w)
            calls = [
                ws[0].call.with_inputs([x for w in ws for x in w.call.inputs()]) for ws in parts.values()
            ]
            self.calls_sent += 1
            self.requests_joined += len(group)
            try:
                results = await self.inner.call_many(key[0], calls)
            except BaseException as exc:  # noqa: BLE001 - every joined request gets the same error
                _fail(group, exc)
                if not isinstance(exc, Exception):
                    raise
                return
            for ws, result in zip(parts.values(), results, strict=True):
                if isinstance(result, BaseException):
                    _fail(ws, result)
                else:
                    _split(ws, result)
        finally:
            self._release(key, lane)

    def stream(self, call: ReplicaCall) -> AsyncIterator[StreamItem]:
        return self.inner.stream(call)

    async def call_many(self, method: str, calls: list[ReplicaCall]) -> list[ReplicaResult | BaseException]:
        return await self.inner.call_many(method, calls)

    async def info(self) -> ReplicaInfo:
        return await self.inner.info()


def _fail(group: list[_Waiting], exc: BaseException) -> None:
    for w in group:
        if not w.future.done():
            w.future.set_exception(exc)


def _split(group: list[_Waiting], result: ReplicaResult) -> None:
    """Each request's slice of its part's result; the part's report goes with the first only."""
    start = 0
    for i, w in enumerate(group):
        n = len(w.call.inputs())
        part = result.model_copy(update={
            "outputs": result.outputs[start:start + n],
            "prompt_tokens": result.prompt_tokens[start:start + n],
            # the report holds counts since the previous one: fold it in once
            "report": result.report if i == 0 else None,
        })
        start += n
        if not w.future.done():
            w.future.set_result(part)
