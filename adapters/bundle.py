"""The `capaboost.v1` bundle: one safetensors file holding, per target layer, the shared
LoRA factors and the d static masks, plus the task's head: classification (sequence and
image) or question answering (docs/bundle-format.md).

Reading goes through `adapters.validation`, so a bundle object always holds a bundle
that passed every format check; nothing is ever half-loaded. In memory the masks are
always bool tensors, whatever the file's `mask_encoding`; `adapters.masks` converts
between the two when a bundle is read or written.
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

from adapters import masks
from adapters.errors import BundleError
from adapters.masks import SEED_LIMIT, MaskEncoding
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
    density: float = Field(
        ..., gt=0.0, le=1.0, description="Mask density in (0, 1]; informational, except for mask_encoding seed."
    )
    targets: list[str] = Field(..., min_length=1, description="Module paths as in model.named_modules().")
    labels: list[str] | None = Field(None, description="sequence- and image-classification only: label names.")
    pooling: Literal["mean", "cls"] | None = Field(
        None, description="sequence- and image-classification only: mean or cls."
    )
    description: str | None = Field(None, description="Optional free text.")
    mask_encoding: MaskEncoding | None = Field(
        None, description="How the masks are stored: dense (the default when absent), packed or seed."
    )
    mask_seed: int | None = Field(
        None, ge=0, lt=SEED_LIMIT, description="mask_encoding seed only: the generator's seed, in [0, 2^64)."
    )

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
        if self.mask_encoding == "seed" and self.mask_seed is None:
            raise ValueError("mask_encoding seed needs mask_seed")
        if self.mask_encoding != "seed" and self.mask_seed is not None:
            raise ValueError("mask_seed is only allowed with mask_encoding seed")
        return self

    @property
    def encoding(self) -> MaskEncoding:
        """How the masks are stored; dense when the header does not say."""
        return self.mask_encoding or "dense"

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
        seed = raw.get("mask_seed")
        # the generator hashes the seed's text: only the canonical decimal spelling is one seed
        if seed is not None and not (seed.isascii() and seed.isdigit() and (seed == "0" or seed[0] != "0")):
            problems.append(f"metadata 'mask_seed' must be a decimal integer in [0, 2^64) without sign or leading zeros, got {seed[:80]!r}")
        elif seed is not None and int(seed) >= SEED_LIMIT:
            problems.append(f"metadata 'mask_seed' must be below 2^64, got {seed[:80]!r}")
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
        """Flat name -> tensor mapping, as stored in the safetensors file: the masks in the
        metadata's encoding (none for seed; `save_bundle` checks they are the generator's)."""
        flat: dict[str, torch.Tensor] = {}
        for name, f in self.targets.items():
            flat[f"{name}.lora_A"] = f.lora_A
            flat[f"{name}.lora_B"] = f.lora_B
            flat.update(masks.encode_target_masks(self.metadata.encoding, name, {"A": f.mask_A, "B": f.mask_B}))
        flat.update(self.head)
        return flat

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def mask_shapes(self) -> list[tuple[int, ...]]:
        """The bool shapes of every mask, [d, r, in] and [d, out, r] per target."""
        return [tuple(t.shape) for f in self.targets.values() for t in (f.mask_A, f.mask_B)]

    def check_encodable(self) -> None:
        """BundleError unless the metadata's encoding can hold these masks: a seed bundle
        stores no masks, so they must be exactly the generator's."""
        meta = self.metadata
        if meta.encoding == "seed":
            assert meta.mask_seed is not None  # BundleMetadata requires it for seed
            masks.check_seed_masks(
                {n: (f.mask_A, f.mask_B) for n, f in self.targets.items()}, meta.mask_seed, meta.density
            )

    def with_encoding(self, encoding: MaskEncoding, mask_seed: int | None = None) -> "AdapterBundle":
        """The same adapter stored as `encoding` (mask_seed for seed only); BundleError if a
        seed bundle would not reproduce these masks."""
        header = {**self.metadata.model_dump(exclude_none=True), "mask_encoding": encoding, "mask_seed": mask_seed}
        out = AdapterBundle(metadata=BundleMetadata(**header), targets=self.targets, head=self.head)
        out.check_encodable()
        return out

    def compact(self, mask_seed: int | None = None) -> "AdapterBundle":
        """The smallest encoding that holds these masks exactly: seed when they are the
        generator's for `mask_seed` (all-true masks at density 1, a plain LoRA's, are every
        seed's: 0 is used), else packed."""
        if mask_seed is None and self.metadata.density == 1.0:
            mask_seed = 0
        if mask_seed is not None:
            pairs = {n: (f.mask_A, f.mask_B) for n, f in self.targets.items()}
            if not masks.seed_mismatches(pairs, mask_seed, self.metadata.density):
                return self.with_encoding("seed", mask_seed)
        return self.with_encoding("packed")


def save_bundle(bundle: AdapterBundle, path: str | os.PathLike[str]) -> Path:
    """Write a bundle atomically (temp file in the same folder, then rename)."""
    bundle.check_encodable()
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

