"""What the ingress sends to a model replica and what comes back: plain pydantic data.

The ingress resolves `model` to a manifest before calling, so a replica never has to
guess what `name` meant; the manifest also lets a replica reload an adapter its engine
evicted without asking the registry again. Results carry plain lists (no tensors), the
batch the request ran in (for the access log) and the replica's metric report.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from adapters.manifest import AdapterManifest
from adapters.precision import PrecisionChoice
from adapters.tasks.kinds import ENCODER_KINDS
from adapters.tasks.qa import QAInput
from serving.engine.sampling import SamplingParams
from serving.metrics import ReplicaReport

#: Replica methods that may run twice: they read their inputs and the weights and change
#: nothing a client sees, so a call lost with its replica is sent once more to another one
#: (serving.ingress.HandleClient). Every encoder method belongs here (`question_answering`
#: is the method of POST /v1/question-answering), and `info`, which readiness asks: a replica
#: lost under it must not make `/readyz` fail while another can serve. Generation is not: a
#: started stream cannot be replayed to its client, and a whole completion may run for minutes.
IDEMPOTENT = frozenset({*(kind.method for kind in ENCODER_KINDS), "info"})


class ReplicaCall(BaseModel):
    """One request for the model deployment; its inputs are of one kind (texts, images or questions)."""

    adapter: AdapterManifest | None = Field(None, description="The resolved adapter; None: the base model.")
    texts: list[str] = Field(default_factory=list, description="Inputs or prompts.")
    images: list[bytes] = Field(default_factory=list, description="An image base's inputs: PNG/JPEG bytes the ingress checked.")
    questions: list[QAInput] = Field(default_factory=list, description="Question-answering inputs.")
    messages: list[dict[str, str]] | None = Field(None, description="Chat messages; templated on the replica.")
    params: SamplingParams | None = Field(None, description="Sampling parameters of a generation.")

    @property
    def ref(self) -> str | None:
        return self.adapter.ref if self.adapter is not None else None

    def _input_field(self) -> str:
        return "questions" if self.questions else "images" if self.images else "texts"

    def inputs(self) -> list[Any]:
        """The call's inputs, of whichever kind it carries: what the replica's scheduler queues."""
        return getattr(self, self._input_field())

    def with_inputs(self, inputs: list[Any]) -> "ReplicaCall":
        """The same call with other inputs of its kind (the ingress joins calls with it)."""
        return self.model_copy(update={self._input_field(): inputs})


class ClassOutput(BaseModel):
    label: str
    probs: list[float]
    label_names: list[str]


class QAOutput(BaseModel):
    """One answer: its text, score and character offsets into the input's context."""

    answer: str
    score: float
    start: int
    end: int


class ServedBy(BaseModel):
    """How a request was served: one structured log line per request reports it."""

    replica: str
    batch_size: int = 1
    swapped: bool = False
    queue_ms: float = 0.0


class ReplicaResult(BaseModel):
    """One answer: per-input outputs, per-input prompt tokens, and bookkeeping."""

    outputs: list[Any] = Field(
        default_factory=list,
        description="Per input: an embedding (float32 array), a ClassOutput, a QAOutput or a GenerationResult.",
    )
    prompt_tokens: list[int] = Field(default_factory=list)
    served_by: ServedBy
    report: ReplicaReport | None = None


class GenerationResult(BaseModel):
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class StreamItem(BaseModel):
    """One streamed delta; the first carries `served_by` and `prompt_tokens`, the last `report`."""

    text: str = ""
    completion_tokens: int = Field(0, description="Tokens in this delta.")
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    served_by: ServedBy | None = None
    report: ReplicaReport | None = None


class ReplicaInfo(BaseModel):
    """What the ingress needs to know of the served base (fetched once)."""

    model_id: str
    task: str
    spec: dict = Field(..., description="BaseModelSpec.to_dict() of the base.")
    has_chat_template: bool
    max_seq_len: int
    replica: str
    registry_error: str | None = Field(None, description="Why this replica cannot reach the registry; None if it can.")
    precision: PrecisionChoice | None = Field(None, description="The base's weight dtype and why.")

