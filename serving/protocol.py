"""Every request and response body of the HTTP API (docs/http-api.md), on one base class.

Fields follow the order of the OpenAI API reference so clients and docs read alike.
Each request converts itself to what the engine takes (`to_sampling_params`, `texts`),
so the serving modules never pick fields apart. Unknown fields are ignored, as OpenAI
clients send options this server does not implement; options it does know but cannot
honour (n > 1, token-id prompts) fail validation with a message naming them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapters.precision import PrecisionChoice
from adapters.tasks.qa import DEFAULT_MAX_ANSWER_LEN, QAInput
from serving.engine.sampling import SamplingParams

#: Largest `max_tokens` a request may ask for; the engine's context bounds it further.
MAX_TOKENS_LIMIT = 4096


class OpenAIBaseModel(BaseModel):
    """Base of every body: ignore unknown fields, keep declared order when dumping."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


def _check_text(value: Any, where: str) -> None:
    """Raise ValueError if a string in `value` is not encodable text (a lone surrogate, which
    JSON can carry as "\\ud800"); tokenizers fail on those, and with them the whole batch."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{where} is not valid Unicode text (lone surrogate at position {exc.start})") from None
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _check_text(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_text(item, f"{where}.{i}")


class OpenAIRequest(OpenAIBaseModel):
    """Base of every request body: all its strings must be valid Unicode text."""

    @model_validator(mode="after")
    def _valid_text(self) -> "OpenAIRequest":
        for name in type(self).model_fields:
            _check_text(getattr(self, name), name)
        return self


def unix_now() -> int:
    return int(time.time())


def make_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------------------- errors


class ErrorInfo(OpenAIBaseModel):
    message: str = Field(..., description="What went wrong, for a human.")
    type: str = Field(..., description="Error kind, e.g. invalid_request_error, not_found_error.")
    code: int = Field(..., description="The HTTP status code.")


class ErrorResponse(OpenAIBaseModel):
    """The error body of docs/http-api.md#errors: {"error": {"message", "type", "code"}}."""

    error: ErrorInfo


#: OpenAPI `responses` of every route: any 4xx (validation errors are 400, not FastAPI's 422)
#: and 5xx carries the error body of docs/http-api.md#errors.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "Client error, with the standard error body."},
    "5XX": {"model": ErrorResponse, "description": "Server error or overload (503), with the standard error body."},
}


# ---------------------------------------------------------------------------- shared


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = Field(0, description="Tokens in the input(s).")
    completion_tokens: int | None = Field(None, description="Generated tokens; absent for encoders.")
    total_tokens: int = Field(0, description="prompt_tokens + completion_tokens.")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = Field(False, description="Send a last chunk with usage before [DONE].")


def _texts(value: str | list[str], field: str) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ValueError(f"{field} must not be empty")
    return texts


def _encoder_inputs(value: str | list[str]) -> str | list[str]:
    """Embeddings and classify inputs: at least one, and no empty string (as OpenAI's embeddings
    refuse `""`, `[""]` and `[]`): an empty text has no tokens to pool but the special ones, so
    its vector or label would describe no input at all. A completion prompt may be empty."""
    if isinstance(value, str):
        if not value:
            raise ValueError("must not be an empty string")
        return value
    if not value:
        raise ValueError("must hold at least one item")
    if empty := [i for i, t in enumerate(value) if not t]:
        raise ValueError(f"item {empty[0]} is an empty string; every input needs at least one character"
                         + (f" ({len(empty)} are empty)" if len(empty) > 1 else ""))
    return value


# ---------------------------------------------------------------------------- embeddings


class EmbeddingRequest(OpenAIRequest):
    """POST /v1/embeddings."""

    input: str | list[str] = Field(
        ..., description="A text or a list of texts to embed; on an image base, images as data:image/...;base64, URLs."
    )
    model: str = Field(..., description="The base model id, an adapter name, or name@version.")
    encoding_format: Literal["float", "base64"] = Field(
        "float",
        description="float: a list of numbers; base64: the vector's little-endian float32 bytes, "
        "base64-encoded (what OpenAI returns, and what its SDK asks for by default).",
    )
    dimensions: int | None = Field(
        None,
        ge=1,
        description="Keep the first N dimensions, then L2-normalise again (Matryoshka-style "
        "truncation); 400 above the model's size. Omit for the full vector.",
    )
    user: str | None = Field(None, description="End-user id; accepted and ignored.")

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        return _encoder_inputs(v)

    def texts(self) -> list[str]:
        return _texts(self.input, "input")


class EmbeddingData(OpenAIBaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str = Field(..., description="Numbers, or a base64 string (encoding_format).")
    index: int


class EncoderUsage(OpenAIBaseModel):
    """Usage of an encoder request: no completion tokens (OpenAI sends none for embeddings)."""

    prompt_tokens: int = Field(0, description="Tokens in the input(s).")
    total_tokens: int = Field(0, description="Equal to prompt_tokens.")


class EmbeddingResponse(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EncoderUsage


# ---------------------------------------------------------------------------- classify


class ClassifyRequest(OpenAIRequest):
    """POST /v1/classify: a classification adapter's label and probabilities per input."""

    model: str = Field(..., description="A sequence- or image-classification adapter name or name@version.")
    input: str | list[str] = Field(
        ...,
        description="A text or a list of texts to classify; on an image base, images as data:image/png;base64,... "
        "or data:image/jpeg;base64,... URLs (remote URLs are refused: the server fetches nothing).",
    )

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        return _encoder_inputs(v)

    def texts(self) -> list[str]:
        return _texts(self.input, "input")


class ClassifyData(OpenAIBaseModel):
    index: int
    label: str
    probs: list[float]


class ClassifyResponse(OpenAIBaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[ClassifyData]
    usage: EncoderUsage


# ---------------------------------------------------------------------------- question answering


class QAPair(OpenAIBaseModel):
    question: str = Field(..., description="The question.")
    context: str = Field(..., description="The text to take the answer from.")


class QuestionAnsweringRequest(OpenAIRequest):
    """POST /v1/question-answering: extractive answers of a question-answering adapter."""

    model: str = Field(..., description="A question-answering adapter name or name@version.")
    input: QAPair | list[QAPair] = Field(..., description="A {question, context} object or a list of them.")
    max_answer_len: int = Field(
        DEFAULT_MAX_ANSWER_LEN, ge=1, description="Longest answer in tokens (docs/bundle-format.md#question-answering)."
    )

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: QAPair | list[QAPair]) -> QAPair | list[QAPair]:
        if isinstance(v, list) and not v:
            raise ValueError("input must not be empty")
        return v

    def questions(self) -> list[QAInput]:
        pairs = [self.input] if isinstance(self.input, QAPair) else self.input
        return [QAInput(question=p.question, context=p.context, max_answer_len=self.max_answer_len) for p in pairs]


class QAData(OpenAIBaseModel):
    index: int
    answer: str = Field(..., description="context[start:end].")
    score: float = Field(..., description="p_start * p_end of the answer span.")
    start: int = Field(..., description="Character offset of the answer's start in its context.")
    end: int = Field(..., description="Character offset of the answer's end in its context.")


class QuestionAnsweringResponse(OpenAIBaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[QAData]
    usage: EncoderUsage


# ---------------------------------------------------------------------------- generation


class _SamplingFields(OpenAIRequest):
    """Sampling options shared by completions and chat, in OpenAI order."""

    def _sampling(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=stop
        )

    @field_validator("n", check_fields=False)
    @classmethod
    def _single_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n = 1 is supported")
        return v


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    model: str = Field(..., description="The base model id, an adapter name, or name@version.")
    prompt: str | list[str] = Field(..., description="A prompt or a list of prompts (one choice each).")
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT, description="Most tokens to generate per prompt.")
    n: int = Field(1, description="Choices per prompt; only 1 is supported.")
    seed: int | None = Field(None, description="Seed for sampling; same seed, same text.")
    stop: str | list[str] | None = Field(None, description="Stop sequences; not included in the text.")
    stream: bool = Field(False, description="Send Server-Sent Events chunks, ending with data: [DONE].")
    stream_options: StreamOptions | None = Field(None, description="include_usage: send a usage chunk.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    user: str | None = Field(None, description="End-user id; logged only.")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        _texts(v, "prompt")
        return v

    def prompts(self) -> list[str]:
        return _texts(self.prompt, "prompt")

    def to_sampling_params(self) -> "SamplingParams":
        return self._sampling(self.max_tokens)


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = ""


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation so far.")
    model: str = Field(..., description="The base model id, an adapter name, or name@version.")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, description="Alias of max_tokens.")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, description="Most tokens to generate.")
    n: int = Field(1, description="Choices; only 1 is supported.")
    seed: int | None = Field(None, description="Seed for sampling; same seed, same text.")
    stop: str | list[str] | None = Field(None, description="Stop sequences; not included in the text.")
    stream: bool = Field(False, description="Send Server-Sent Events chunks, ending with data: [DONE].")
    stream_options: StreamOptions | None = Field(None, description="include_usage: send a usage chunk.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    user: str | None = Field(None, description="End-user id; logged only.")

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as the tokenizer's chat template takes them."""
        return [{"role": m.role, "content": m.content or ""} for m in self.messages]

    def to_sampling_params(self) -> "SamplingParams":
        return self._sampling(self.max_completion_tokens or self.max_tokens or 16)


class CompletionChoice(OpenAIBaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: make_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=unix_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(OpenAIBaseModel):
    """One SSE chunk of a streamed completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: make_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=unix_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    """One SSE chunk of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------------------- models


class ModelCard(OpenAIBaseModel):
    id: str = Field(..., description="What to send as `model`: the base id or name@version's name.")
    object: Literal["model"] = "model"
    created: int = Field(default_factory=unix_now)
    owned_by: str = "capaserve"
    root: str | None = Field(None, description="The pinned id name@version for adapters; the base id for the base.")
    parent: str | None = Field(None, description="The base model id for adapters; null for the base.")
    task: str | None = Field(
        None,
        description="feature-extraction, sequence-classification, question-answering, image-classification or "
        "causal-lm; for the base, what it serves plainly (feature-extraction for an encoder).",
    )
    modality: str | None = Field(None, description="text or image: what the model's inputs are.")
    precision: PrecisionChoice | None = Field(
        None, description="The base only: its weight dtype, the dtype setting, and why (the startup guard's verdict)."
    )


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _fields(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return {name: getattr(obj, name) for name in type(obj).model_fields}
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def render(body: BaseModel) -> bytes:
    """A response body as JSON bytes, written by orjson from the model's fields.

    What `body.model_dump(mode="json")` gives for the bodies here (None fields kept: OpenAI
    clients expect them), but numpy vectors are written as they are: an embedding is not
    turned into 384 Python floats to be validated and dumped one by one, which costs more
    than the model's share of the request (loadtest/results/overheads.md). float32
    values are written in their shortest form, which reads back to the same float32.
    """
    return orjson.dumps(body, default=_fields, option=orjson.OPT_SERIALIZE_NUMPY)
