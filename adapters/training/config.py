"""`TrainConfig`: everything one `capaserve train` run needs, validated before any model
is loaded so a bad flag fails in milliseconds, naming the flag. `capaserve train` has one
flag per field, generated from this model (serving.config_sources.add_model_flags): the
field's name with dashes, unless `json_schema_extra` names the flag (`copies`, `eval`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapters.bundle import CLASSIFICATION_TASKS, Task
from adapters.default_model import DEFAULT_MODEL_ID, default_model_dir
from adapters.masks import SEED_LIMIT, MaskEncoding


class TrainConfig(BaseModel):
    """One training run: base model, data, CapaBoost hyper-parameters, optimisation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(
        None, description="Base model id or folder.",
        json_schema_extra={"default_doc": "the embedded all-MiniLM-L6-v2"},
    )
    base_model_id: str | None = Field(
        None, description="base_model recorded in the bundle.",
        json_schema_extra={"default_doc": "the MiniLM id, else --model"},
    )
    task: Task = Field(
        ...,
        description=(
            "feature-extraction, sequence-classification, question-answering, image-classification or causal-lm."
        ),
    )
    data: Path = Field(..., description="Training JSONL file.")
    eval_data: Path | None = Field(
        None, description="Evaluation JSONL file.",
        json_schema_extra={"flag": "eval", "default_doc": "the training data"},
    )
    output: Path = Field(
        ..., description="Where the capaboost.v1 bundle is written (atomically).", json_schema_extra={"short": "-o"}
    )
    rank: int = Field(8, ge=1, description="r: rank of the shared LoRA factors A [r, in], B [out, r].")
    num_copies: int = Field(
        2, ge=1, description="d: number of static masks (masked copies sharing A, B).",
        json_schema_extra={"flag": "copies"},
    )
    density: float = Field(0.5, gt=0.0, le=1.0, description="Probability that a mask entry is kept.")
    alpha: float = Field(16.0, gt=0.0, description="LoRA alpha; the update is scaled by alpha / r.")
    targets: list[str] = Field(
        ["query", "value"],
        min_length=1,
        description="Module-name suffixes matched against the model's Linear/Conv1D layers (as PEFT).",
    )
    epochs: int | None = Field(
        None, ge=1, description="Passes over the data; exclusive with steps.", json_schema_extra={"default_doc": "3"}
    )
    steps: int | None = Field(None, ge=1, description="Optimiser steps (cycling the data); exclusive with epochs.")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate for the factors (and the head).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient-norm clip, for stability of short runs.")
    batch_size: int = Field(16, ge=1, description="Examples per step (and the in-batch negatives for embeddings).")
    max_length: int | None = Field(
        None,
        ge=2,
        description=(
            "Tokens per text after truncation; question-answering: tokens per window (the server's "
            "default when unset). Unused for images."
        ),
        json_schema_extra={"default_doc": "128; question-answering: min(384, the model's limit)"},
    )
    seed: int = Field(0, description="Seeds factor init, head init, dropout and data order.")
    mask_seed: int | None = Field(
        None, ge=0, lt=SEED_LIMIT,
        description="Seed of the masks' generator (docs/bundle-format.md#mask-encodings); None picks a random one, recorded in the bundle.",
    )
    mask_encoding: MaskEncoding = Field(
        "seed", description="How the bundle stores the masks: seed (no mask bytes), packed (1 bit each) or dense (bool)."
    )
    pooling: Literal["mean", "cls"] | None = Field(
        None,
        description=(
            "Classification pooling: attention-masked mean, or the first token (what "
            "ViTForImageClassification classifies)."
        ),
        json_schema_extra={"default_doc": "mean for text, cls for images"},
    )
    temperature: float = Field(
        0.05, gt=0.0, description="feature-extraction: softmax temperature of the contrastive loss."
    )
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N.")
    progress: bool = Field(True, description="Show a tqdm progress bar with the running loss.")

    @field_validator("targets")
    @classmethod
    def _clean_targets(cls, v: list[str]) -> list[str]:
        out = [t.strip().strip(".") for t in v]
        if any(not t for t in out):
            raise ValueError("targets must be non-empty module-name suffixes")
        return list(dict.fromkeys(out))

    @model_validator(mode="after")
    def _epochs_or_steps(self) -> "TrainConfig":
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give either epochs or steps, not both")
        return self

    @property
    def resolved_pooling(self) -> Literal["mean", "cls"] | None:
        """The bundle's pooling: the flag, else the task's default; None for tasks without a classifier."""
        if self.task not in CLASSIFICATION_TASKS:
            return None
        if self.pooling is not None:
            return self.pooling
        return "cls" if self.task is Task.IMAGE_CLASSIFICATION else "mean"

    @property
    def resolved_base_model_id(self) -> str:
        """What the bundle's base_model says: explicit id, else the default id, else --model."""
        if self.base_model_id:
            return self.base_model_id
        return DEFAULT_MODEL_ID if self.model is None else self.model

    def model_source(self) -> str:
        """The id or folder transformers loads; the embedded MiniLM when `model` is None."""
        if self.model is not None:
            return self.model
        return default_model_dir()
