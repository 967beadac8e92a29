"""The kinds of request a model replica computes: one enum, spelled once.

A kind's value is its name inside a replica (the scheduler's queue, the engine's rows, logs).
The model deployment answers each kind with one method (`RequestKind.method`), whose name is
also the `method` label of the replica-retry metric; both are part of what operators see, so
neither changes: question answering is the kind `qa` and the method `question_answering`.
`RequestKind` is a str enum, so a member equals its value and serialises as it.
"""

from __future__ import annotations

from enum import StrEnum


class RequestKind(StrEnum):
    EMBED = "embed"
    CLASSIFY = "classify"
    QA = "qa"
    GENERATE = "generate"
    #: one generation streamed token by token (on the decode loop, as GENERATE)
    STREAM = "stream"

    @property
    def method(self) -> str:
        """The model deployment's method that answers this kind."""
        return _METHODS[self]


_METHODS = {
    RequestKind.EMBED: "embed",
    RequestKind.CLASSIFY: "classify",
    RequestKind.QA: "question_answering",
    RequestKind.GENERATE: "generate",
    RequestKind.STREAM: "generate_stream",
}

#: Kinds that share one encoder forward: a batch may hold any of them (each row gets its own head).
ENCODER_KINDS: tuple[RequestKind, ...] = (RequestKind.EMBED, RequestKind.CLASSIFY, RequestKind.QA)
