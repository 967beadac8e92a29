"""The `capaboost.v1` bundle: one safetensors file holding, per target layer, the shared
LoRA factors and the d static masks, plus the task's head: classification (sequence and
image) or question answering (docs/bundle-format.md).

Reading goes through `adapters.validation`, so a bundle object always holds a bundle
that passed every format check; nothing is ever half-loaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapters.errors import BundleError
from adapters.files import new_file_mode

FORMAT = "capaboost.v1"

#: Tensor name suffixes of one target, in the order docs/bundle-format.md#tensors lists them.
TARGET_TENSORS = ("lora_A", "lora_B", "mask_A", "mask_B")
#: Head tensors of classification (sequence and image) bundles; `head.dense.*` is optional.
CLASSIFICATION_HEAD = ("head.dense.weight", "head.dense.bias", "head.out.weight", "head.out.bias")
#: Head tensors of question-answering bundles: start and end logits per token.
QA_HEAD = ("head.qa.weight", "head.qa.bias")
HEAD_TENSORS = CLASSIFICATION_HEAD + QA_HEAD

#: What a base model takes as input: text (tokenized) or images (its image processor).
Modality = Literal["text", "image"]


class Task(str, Enum):
    """What a bundle (and a base model) is for; decides which endpoints may use it."""

    FEATURE_EXTRACTION = "feature-extraction"
    SEQUENCE_CLASSIFICATION = "sequence-classification"
    QUESTION_ANSWERING = "question-answering"
    IMAGE_CLASSIFICATION = "image-classification"
    CAUSAL_LM = "causal-lm"

    @property
    def modality(self) -> Modality | None:
        """The input an adapter of this task needs from its base; None (feature-extraction):
        whatever the base encodes, text or images."""
        if self is Task.FEATURE_EXTRACTION:
            return None
        return "image" if self is Task.IMAGE_CLASSIFICATION else "text"


#: Tasks whose bundles carry labels, pooling and the classification head.
CLASSIFICATION_TASKS = frozenset({Task.SEQUENCE_CLASSIFICATION, Task.IMAGE_CLASSIFICATION})


class BundleMetadata(BaseModel):
    """The safetensors `__metadata__` of a bundle, typed. On disk every value is a string."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    format: Literal["capaboost.v1"] = Field(FORMAT, description="Bundle format tag; always capaboost.v1.")
    base_model: str = Field(..., min_length=1, description="Id of the base model the adapter was trained on.")
    task: Task = Field(
        ...,
        description="feature-extraction, sequence-classification, question-answering, image-classification or causal-lm.",
    )
    rank: int = Field(..., ge=1, description="r: rank of the shared LoRA factors.")
    num_copies: int = Field(..., ge=1, description="d: number of static masks, i.e. parallel masked copies.")
    alpha: float = Field(..., description="LoRA alpha; the update is scaled by alpha / r.")
    density: float = Field(..., gt=0.0, le=1.0, description="Mask density in (0, 1]; informational.")
    targets: list[str] = Field(..., min_length=1, description="Module paths as in model.named_modules().")
    labels: list[str] | None = Field(None, description="sequence- and image-classification only: label names.")
    pooling: Literal["mean", "cls"] | None = Field(
        None, description="sequence- and image-classification only: mean or cls."
    )
    description: str | None = Field(None, description="Optional free text.")

    @field_validator("alpha")
    @classmethod
    def _finite_alpha(cls, v: float) -> float:
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("alpha must be a finite number")
        return v

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("targets must not repeat a module path")
        if any(not t or not isinstance(t, str) for t in v):
            raise ValueError("targets must be non-empty module paths")
        return v

    @model_validator(mode="after")
    def _classification_keys(self) -> "BundleMetadata":
        if self.task in CLASSIFICATION_TASKS:
            if not self.labels:
                raise ValueError(f"labels is required for task {self.task.value}")
            if self.pooling is None:
                raise ValueError(f"pooling is required for task {self.task.value}")
        elif self.labels is not None or self.pooling is not None:
            raise ValueError("labels and pooling are only allowed for task sequence-classification or image-classification")
        return self

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_header(cls, header: dict[str, str] | None) -> "BundleMetadata":
        """Parse the string-valued header; raises BundleError naming every bad key."""
        if header is None:
            raise BundleError("safetensors header has no __metadata__")
        problems: list[str] = []
        known = set(cls.model_fields)
        raw: dict[str, Any] = {}
        for key, value in header.items():
            if key not in known:
                problems.append(f"unexpected metadata key {key!r}")
                continue
            if not isinstance(value, str):
                problems.append(f"metadata {key!r} must be a string, got {type(value).__name__}")
                continue
            if key in ("targets", "labels"):
                try:
                    raw[key] = json.loads(value)
                except json.JSONDecodeError:
                    problems.append(f"metadata {key!r} must be a JSON list, got {value[:80]!r}")
                    continue
                if not isinstance(raw[key], list) or not all(isinstance(x, str) for x in raw[key]):
                    problems.append(f"metadata {key!r} must be a JSON list of strings, got {value[:80]!r}")
                    raw.pop(key)
            else:
                raw[key] = value
        for key in ("format", "base_model", "task", "rank", "num_copies", "alpha", "density", "targets"):
            if key not in header:
                problems.append(f"missing metadata key {key!r}")
        if "format" in raw and raw["format"] != FORMAT:
            problems.append(f"metadata 'format' must be {FORMAT!r}, got {raw['format']!r}")
        for key in ("rank", "num_copies"):
            if key in raw and not str(raw[key]).strip().lstrip("-").isdigit():
                problems.append(f"metadata {key!r} must be an integer, got {raw[key]!r}")
        if not problems:
            try:
                return cls.model_validate(raw)
            except ValidationError as exc:
                for err in exc.errors():
                    loc = ".".join(str(p) for p in err["loc"]) or "metadata"
                    got = err.get("input")
                    got_s = f", got {got!r}" if isinstance(got, (str, int, float)) else ""
                    problems.append(f"metadata {loc!r}: {err['msg']}{got_s}")
        raise BundleError(problems)

    def to_header(self) -> dict[str, str]:
        """The string-valued safetensors header for this metadata."""
        out: dict[str, str] = {}
        for key, value in self.model_dump(exclude_none=True).items():
            if isinstance(value, Enum):
                value = value.value
            out[key] = json.dumps(value) if isinstance(value, list) else str(value)
        return out


@dataclass
class TargetFactors:
    """One target's shared factors (A [r, in], B [out, r]) and masks ([d, r, in], [d, out, r])."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    mask_A: torch.Tensor
    mask_B: torch.Tensor

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]


@dataclass
class AdapterBundle:
    """A validated bundle in memory: metadata, per-target factors and the optional head."""

    metadata: BundleMetadata
    targets: dict[str, TargetFactors]
    head: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor mapping, as stored in the safetensors file."""
        flat: dict[str, torch.Tensor] = {}
        for name, f in self.targets.items():
            for suffix in TARGET_TENSORS:
                flat[f"{name}.{suffix}"] = getattr(f, suffix)
        flat.update(self.head)
        return flat

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def save_bundle(bundle: AdapterBundle, path: str | os.PathLike[str]) -> Path:
    """Write a bundle atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in bundle.tensors().items()}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=bundle.metadata.to_header())
        os.chmod(tmp, new_file_mode())  # not mkstemp's 0600 (adapters.files)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

