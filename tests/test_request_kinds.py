"""The request kinds are one enum, and the names operators see stay what they were: the
replica methods (the `method` label of capaserve_replica_retries_total) and the kind values."""

from __future__ import annotations

from adapters.tasks.kinds import ENCODER_KINDS, RequestKind
from serving.coalesce import JOINABLE
from serving.deployments import ModelServer
from serving.replica_io import IDEMPOTENT


def test_kind_values_and_methods_are_the_published_names() -> None:
    assert [k.value for k in RequestKind] == ["embed", "classify", "qa", "generate", "stream"]
    assert {k: k.method for k in RequestKind} == {
        "embed": "embed", "classify": "classify", "qa": "question_answering",
        "generate": "generate", "stream": "generate_stream",
    }
    assert RequestKind.QA == "qa" and f"{RequestKind.QA}" == "qa"


def test_joinable_and_retryable_methods_come_from_the_encoder_kinds() -> None:
    assert JOINABLE == {"embed", "classify", "question_answering"}
    assert IDEMPOTENT == JOINABLE | {"info"}
    assert ENCODER_KINDS == (RequestKind.EMBED, RequestKind.CLASSIFY, RequestKind.QA)


def test_every_kind_has_its_method_on_the_model_deployment() -> None:
    for kind in RequestKind:
        assert callable(getattr(ModelServer, kind.method)), kind
