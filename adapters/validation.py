"""Bundle validation in two stages, each reporting every problem at once.

1. Format (`load_bundle`): the safetensors header is parsed by hand, so names, shapes,
   dtypes and metadata (the mask encoding's sizes and dtypes, and `mask_seed` included) are
   checked before a single tensor byte is read; only then are tensors loaded, checked for
   NaN/Inf and packed masks for pad bits, and the masks decoded to bool by
   `adapters.masks`. Safetensors is a flat JSON header plus raw
   bytes, so no code is ever executed: pickles are rejected as "not a safetensors file".
2. Servability (`check_servable`): the bundle against one base model (its id, task,
   target modules and their shapes). Kept separate because the registry validates
   uploads against the served base while `capaserve inspect` has no base at all.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from transformers.pytorch_utils import Conv1D

from adapters.bundle import (
    CLASSIFICATION_TASKS,
    HEAD_TENSORS,
    QA_HEAD,
    TARGET_TENSORS,
    AdapterBundle,
    BundleMetadata,
    Modality,
    Task,
    TargetFactors,
)
from adapters import masks
from adapters.errors import BundleError

#: Largest header we accept; real bundles have a few KiB of header.
MAX_HEADER_BYTES = 16 * 1024 * 1024
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}

#: Bundle tasks an encoder base (loaded with AutoModel) can serve, if its modality fits.
ENCODER_TASKS = frozenset(
    {Task.FEATURE_EXTRACTION, Task.SEQUENCE_CLASSIFICATION, Task.QUESTION_ANSWERING, Task.IMAGE_CLASSIFICATION}
)
#: Which bundle tasks a base model of a given task can serve (keyed by every task, since
#: `capaserve pack --check-base` describes the base by the bundle's own task). Whether the
#: base takes text or images is checked apart (`Task.modality` against the base's).
SERVABLE_TASKS: dict[Task, frozenset[Task]] = {
    **{t: ENCODER_TASKS for t in ENCODER_TASKS},
    Task.CAUSAL_LM: frozenset({Task.CAUSAL_LM}),
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def _read_source(source: str | os.PathLike[str] | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    return Path(source).read_bytes()


def parse_header(data: bytes) -> tuple[dict[str, str] | None, dict[str, TensorInfo]]:
    """Parse a safetensors header without reading tensors; BundleError if it is not one."""
    not_st = "not a valid safetensors file"
    if len(data) < 8:
        raise BundleError(f"{not_st}: {len(data)} bytes is too short for a header")
    (n,) = struct.unpack("<Q", data[:8])
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise BundleError(f"{not_st}: header length {n} does not fit a {len(data)}-byte file")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{not_st}: header is not JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise BundleError(f"{not_st}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise BundleError(f"{not_st}: __metadata__ is not an object")
    body = len(data) - 8 - n
    infos: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for name, entry in header.items():
        try:
            dtype, raw_shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{not_st}: malformed entry for tensor {name!r}")
            continue
        # JSON gives any type: only lists of non-negative ints are a shape / offsets
        ints = [*raw_shape, start, end] if isinstance(raw_shape, list) else None
        if ints is None or not isinstance(dtype, str) or not all(type(x) is int and x >= 0 for x in ints):
            problems.append(f"{not_st}: malformed entry for tensor {name!r}")
            continue
        shape = tuple(raw_shape)
        if not (0 <= start <= end <= body):
            problems.append(f"{not_st}: tensor {name!r} lies outside the file (truncated?)")
            continue
        infos[name] = TensorInfo(dtype=str(dtype), shape=shape)
    if problems:
        raise BundleError(problems)
    return metadata, infos


def _expect(problems: list[str], name: str, info: TensorInfo | None, shape: tuple[int, ...], kind: str) -> None:
    if info is None:
        return
    if info.shape != shape:
        problems.append(f"tensor {name!r}: expected shape {list(shape)}, got {list(info.shape)}")
    if kind == "float" and info.dtype not in FLOAT_DTYPES:
        problems.append(f"tensor {name!r}: expected a float16, bfloat16 or float32 weight, got dtype {info.dtype}")
    if kind == "bool" and info.dtype != "BOOL":
        problems.append(f"tensor {name!r}: expected a bool mask, got dtype {info.dtype}")
    if kind == "packed" and info.dtype != "U8":
        problems.append(f"tensor {name!r}: expected a packed mask (uint8, mask_encoding packed), got dtype {info.dtype}")


def _expect_mask(
    problems: list[str], meta: BundleMetadata, name: str, info: TensorInfo | None, shape: tuple[int, ...]
) -> None:
    """A mask tensor as the metadata's encoding stores it: bool `shape`, or uint8 [ceil(n / 8)]."""
    if meta.encoding == "packed":
        _expect(problems, name, info, (masks.packed_size(shape),), "packed")
    elif meta.encoding == "dense":
        _expect(problems, name, info, shape, "bool")


def check_layout(meta: BundleMetadata, infos: dict[str, TensorInfo]) -> list[str]:
    """Names, shapes and dtypes against the metadata; every problem, expected vs received."""
    problems: list[str] = []
    r, d = meta.rank, meta.num_copies
    # a seed bundle stores no masks: its metadata generates them
    suffixes = TARGET_TENSORS if meta.encoding != "seed" else ("lora_A", "lora_B")
    expected: set[str] = {f"{t}.{s}" for t in meta.targets for s in suffixes}
    if meta.task in CLASSIFICATION_TASKS:
        expected |= {"head.out.weight", "head.out.bias"}
        if "head.dense.weight" in infos or "head.dense.bias" in infos:
            expected |= {"head.dense.weight", "head.dense.bias"}
    elif meta.task is Task.QUESTION_ANSWERING:
        expected |= set(QA_HEAD)
    for name in sorted(expected - infos.keys()):
        problems.append(f"missing tensor {name!r}")
    for name in sorted(infos.keys() - expected):
        seed_mask = meta.encoding == "seed" and name.rpartition(".")[0] in meta.targets and name.endswith((".mask_A", ".mask_B"))
        problems.append(f"unexpected tensor {name!r}" + (" (mask_encoding seed stores no mask tensors)" if seed_mask else ""))
    for t in meta.targets:
        a, b = infos.get(f"{t}.lora_A"), infos.get(f"{t}.lora_B")
        if a is not None and len(a.shape) != 2 or b is not None and len(b.shape) != 2:
            problems.append(f"target {t!r}: lora_A and lora_B must be 2-D")
            continue
        in_f = a.shape[1] if a is not None else None
        out_f = b.shape[0] if b is not None else None
        if in_f is not None:
            _expect(problems, f"{t}.lora_A", a, (r, in_f), "float")
            _expect_mask(problems, meta, f"{t}.mask_A", infos.get(f"{t}.mask_A"), (d, r, in_f))
        if out_f is not None:
            _expect(problems, f"{t}.lora_B", b, (out_f, r), "float")
            _expect_mask(problems, meta, f"{t}.mask_B", infos.get(f"{t}.mask_B"), (d, out_f, r))
    if meta.task in CLASSIFICATION_TASKS and meta.labels:
        out_w = infos.get("head.out.weight")
        hidden = out_w.shape[1] if out_w is not None and len(out_w.shape) == 2 else None
        n = len(meta.labels)
        if hidden is None and out_w is not None:
            problems.append(f"tensor 'head.out.weight': expected 2-D [num_labels, hidden], got {list(out_w.shape)}")
        if hidden is not None:
            _expect(problems, "head.out.weight", out_w, (n, hidden), "float")
            _expect(problems, "head.out.bias", infos.get("head.out.bias"), (n,), "float")
            _expect(problems, "head.dense.weight", infos.get("head.dense.weight"), (hidden, hidden), "float")
            _expect(problems, "head.dense.bias", infos.get("head.dense.bias"), (hidden,), "float")
    if meta.task is Task.QUESTION_ANSWERING:
        qa_w = infos.get("head.qa.weight")
        if qa_w is not None and len(qa_w.shape) != 2:
            problems.append(f"tensor 'head.qa.weight': expected 2-D [2, hidden], got {list(qa_w.shape)}")
        elif qa_w is not None:
            _expect(problems, "head.qa.weight", qa_w, (2, qa_w.shape[1]), "float")
            _expect(problems, "head.qa.bias", infos.get("head.qa.bias"), (2,), "float")
    return problems


def load_bundle(source: str | os.PathLike[str] | bytes) -> AdapterBundle:
    """Read a bundle from a path or bytes, checking format, layout and values; raises one
    BundleError listing every problem. The only way to read a bundle."""
    data = _read_source(source)
    header, infos = parse_header(data)
    meta = BundleMetadata.from_header(header)
    problems = check_layout(meta, infos)
    if problems:
        raise BundleError(problems)
    try:
        tensors = st_load(data)
    except Exception as exc:  # the header parsed, so this is corruption inside the data
        raise BundleError(f"not a valid safetensors file: {exc}") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            problems.append(f"tensor {name!r} holds NaN or Inf")
    if meta.encoding == "packed":
        for t in meta.targets:
            for m, shape in _mask_shapes(meta, tensors, t).items():
                if not masks.pad_bits_clear(tensors[f"{t}.mask_{m}"], int(torch.Size(shape).numel())):
                    problems.append(f"tensor '{t}.mask_{m}': the pad bits after the last mask element must be 0")
    if problems:
        raise BundleError(problems)
    targets: dict[str, TargetFactors] = {}
    for t in meta.targets:
        decoded = masks.target_masks(
            meta.encoding, t, _mask_shapes(meta, tensors, t), tensors, mask_seed=meta.mask_seed, density=meta.density
        )
        targets[t] = TargetFactors(
            lora_A=tensors[f"{t}.lora_A"], lora_B=tensors[f"{t}.lora_B"], mask_A=decoded["A"], mask_B=decoded["B"]
        )
    head = {k: tensors[k] for k in HEAD_TENSORS if k in tensors}
    return AdapterBundle(metadata=meta, targets=targets, head=head)


def _mask_shapes(meta: BundleMetadata, tensors: dict[str, torch.Tensor], target: str) -> dict[masks.Matrix, tuple[int, ...]]:
    """The bool shapes of one target's masks, from its (checked) factors."""
    r, i = tensors[f"{target}.lora_A"].shape
    o = tensors[f"{target}.lora_B"].shape[0]
    return {m: masks.mask_shape(m, meta.num_copies, r, i, o) for m in ("A", "B")}


@dataclass(frozen=True)
class BaseModelSpec:
    """What servability needs to know of a base model; plain data, so it crosses Ray."""

    model_id: str
    task: Task
    hidden_size: int
    #: module path -> (out_features, in_features) for every Linear / Conv1D of the model
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: what the base encodes: text (a tokenizer) or images (an image processor)
    modality: Modality = "text"

    @classmethod
    def from_model(
        cls, model_id: str, task: Task, model: torch.nn.Module, hidden_size: int, modality: Modality = "text"
    ) -> "BaseModelSpec":
        shapes: dict[str, tuple[int, int]] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                shapes[name] = (mod.out_features, mod.in_features)
            elif isinstance(mod, Conv1D):
                shapes[name] = (mod.nf, mod.weight.shape[0])
        return cls(model_id=model_id, task=task, hidden_size=hidden_size, linear_shapes=shapes, modality=modality)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "task": self.task.value,
            "hidden_size": self.hidden_size,
            "linear_shapes": {k: list(v) for k, v in self.linear_shapes.items()},
            "modality": self.modality,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BaseModelSpec":
        return cls(
            model_id=d["model_id"],
            task=Task(d["task"]),
            hidden_size=int(d["hidden_size"]),
            linear_shapes={k: (int(v[0]), int(v[1])) for k, v in d["linear_shapes"].items()},
            modality="image" if d.get("modality") == "image" else "text",
        )


def check_servable(bundle: AdapterBundle, base: BaseModelSpec) -> None:
    """Raise BundleError listing every way `bundle` does not fit `base`."""
    meta = bundle.metadata
    problems: list[str] = []
    if meta.base_model != base.model_id:
        problems.append(f"base_model {meta.base_model!r} does not match the served base {base.model_id!r}")
    if meta.task not in SERVABLE_TASKS[base.task]:
        problems.append(f"task {meta.task.value!r} cannot be served on a {base.task.value} base model")
    elif meta.task.modality not in (None, base.modality):
        problems.append(
            f"task {meta.task.value!r} needs a base model that takes {meta.task.modality} input; "
            f"{base.model_id!r} takes {base.modality}"
        )
    for t, f in bundle.targets.items():
        shape = base.linear_shapes.get(t)
        if shape is None:
            problems.append(f"target {t!r} is not a Linear module of the base model")
        elif shape != (f.out_features, f.in_features):
            problems.append(
                f"target {t!r}: base layer is [out={shape[0]}, in={shape[1]}], "
                f"adapter is [out={f.out_features}, in={f.in_features}]"
            )
    for name in ("head.out.weight", "head.qa.weight"):
        w = bundle.head.get(name)
        if w is not None and w.shape[1] != base.hidden_size:
            problems.append(f"head hidden size {w.shape[1]} does not match the base hidden size {base.hidden_size}")
    if problems:
        raise BundleError(problems)
