"""What the engine returns: a dataclass for encoder rows (tensors), pydantic for everything else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, Field

from adapters.bundle import Task
from adapters.tasks.kinds import RequestKind

FinishReason = Literal["stop", "length"]


@dataclass
class EncodedRow:
    """One input of an encoder batch: its embedding [dim], its classification (CPU float32),
    or its answer (question answering: the text, its score and character offsets).

    Rows of every encoder task share one forward (same adapter, or mixed), so the
    scheduler can batch the endpoints together.
    """

    task: RequestKind
    prompt_tokens: int
    embedding: torch.Tensor | None = None
    label: str | None = None
    probs: torch.Tensor | None = None
    label_names: list[str] | None = None
    answer: str | None = None
    score: float | None = None
    start: int | None = None
    end: int | None = None


class GenerationOutput(BaseModel):
    text: str = Field(..., description="Completion text, cut before the first stop string.")
    token_ids: list[int] = Field(..., description="Generated token ids (an EOS that ended it included).")
    finish_reason: FinishReason = Field(..., description="stop (EOS or stop string) or length (max_tokens).")
    prompt_tokens: int
    completion_tokens: int


class GenerationDelta(BaseModel):
    text: str = Field(..., description="New text since the previous delta (may be empty).")
    token_ids: list[int] = Field(..., description="Tokens generated since the previous delta.")
    finish_reason: FinishReason | None = Field(None, description="Set on the last delta only.")


class LoadedAdapterInfo(BaseModel):
    name: str
    task: Task
    mode: Literal["dense", "factors"] = Field(..., description="The form it is built into when activated: dense delta or factor pair.")
    nbytes: int = Field(..., description="Bytes it holds in the cache when loaded: factors, packed masks, head.")
    labels: list[str] | None = Field(None, description="Label names of a sequence- or image-classification adapter.")


class EngineStats(BaseModel):
    active_adapter: str | None
    swaps: int = Field(..., description="Times target weights were rewritten.")
    swap_seconds_total: float
    last_swap_seconds: float
    cache_hits: int = Field(..., description="Requests/activations that found their adapter loaded.")
    cache_misses: int = Field(..., description="load_adapter calls (the adapter had to be loaded).")
    cache_evictions: int = Field(..., description="Adapters dropped by the LRU to stay within adapter_cache_bytes.")
    cache_bytes: int = Field(..., description="Bytes the adapter cache holds: every adapter's compact form plus the built forms kept.")
    loaded_adapters: int
