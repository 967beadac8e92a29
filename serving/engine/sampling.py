"""`SamplingParams`: the decoding parameters of one generation request."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """Per-request decoding parameters (OpenAI semantics; temperature 0 means greedy)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(16, ge=1, description="Most tokens to generate; reaching it finishes with 'length'.")
    temperature: float = Field(1.0, ge=0.0, description="Softmax temperature; 0 picks the most likely token.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set with this mass.")
    seed: int | None = Field(None, description="Seed of the request's own torch.Generator; same seed, same text.")
    stop: list[str] = Field(default_factory=list, description="Text ends before the first of these strings.")
