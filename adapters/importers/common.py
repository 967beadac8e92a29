"""What both importers share: their error type, the module-path prefix mapping, reading
a tensor file without executing code, and the final round trip through validation.

Module paths. A bundle names targets as `model.named_modules()` of the transformers
model capaserve serves: `AutoModel` for every encoder task (feature-extraction, text and
image classification, question-answering), `AutoModelForCausalLM` for causal-lm. A
checkpoint trained on a task model (`BertForSequenceClassification`, an
adapter-transformers `BertAdapterModel`) holds the encoder under its `base_model_prefix`
(`bert.encoder.layer.0...`), while `AutoModel` *is* the encoder (`encoder.layer.0...`). `PrefixMap` rewrites the leading part of each path by
explicit `OLD=NEW` rules; its default for the encoder tasks strips the backbone prefixes
listed in `ENCODER_BACKBONES`, and for causal-lm it changes nothing (PEFT and
adapter-transformers wrap the causal-LM model itself, whose paths already match).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import load_file, save

from adapters.bundle import AdapterBundle, Task
from adapters.errors import BundleError
from adapters.validation import load_bundle

#: transformers' `base_model_prefix` of common encoder families, text and image: the
#: attribute under which a task model (…ForSequenceClassification, …ForImageClassification,
#: adapter heads) holds what AutoModel returns.
ENCODER_BACKBONES = ("bert", "roberta", "distilbert", "deberta", "electra", "albert", "mpnet", "vit", "deit")

#: Weight dtypes a bundle may hold; anything else floating (float64) is stored as float32.
BUNDLE_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class ConversionError(BundleError):
    """A PEFT folder or reference checkpoint cannot become a bundle; lists every reason."""


class PrefixMap(BaseModel):
    """Ordered `OLD -> NEW` rewrites of a module path's leading part; the first match wins.

    An empty OLD matches every path (so `=model.` prepends `model.`); a path no rule
    matches is kept as is.
    """

    model_config = ConfigDict(frozen=True)

    rules: tuple[tuple[str, str], ...] = Field((), description="(old prefix, new prefix) pairs, tried in order.")

    @classmethod
    def default(cls, task: Task) -> "PrefixMap":
        """Strip an encoder backbone prefix for AutoModel tasks; identity for causal-lm."""
        if task is Task.CAUSAL_LM:
            return cls()
        return cls(rules=tuple((f"{p}.", "") for p in ENCODER_BACKBONES))

    @classmethod
    def parse(cls, specs: Iterable[str]) -> "PrefixMap":
        """From CLI strings `OLD=NEW` (either side may be empty)."""
        rules = []
        for spec in specs:
            old, sep, new = spec.partition("=")
            if not sep:
                raise ConversionError(f"prefix map {spec!r} must look like OLD=NEW (e.g. 'bert.=' or '=model.')")
            rules.append((old, new))
        return cls(rules=tuple(rules))

    def apply(self, path: str) -> str:
        for old, new in self.rules:
            if path.startswith(old):
                return new + path[len(old) :]
        return path

    def map_all(self, paths: Iterable[str]) -> dict[str, str]:
        """source path -> bundle path for every path; ConversionError if two collide or one empties."""
        out: dict[str, str] = {}
        seen: dict[str, str] = {}
        problems = []
        for p in paths:
            q = self.apply(p)
            if not q or q.startswith(".") or q.endswith("."):
                problems.append(f"module path {p!r} maps to the invalid path {q!r}")
            elif q in seen:
                problems.append(f"module paths {seen[q]!r} and {p!r} both map to {q!r}")
            seen[q] = p
            out[p] = q
        if problems:
            raise ConversionError(problems)
        return out


def natural_key(path: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting layer.2 before layer.10 (safetensors stores keys alphabetically)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"\.", path))


def bundle_dtype(t: torch.Tensor) -> torch.Tensor:
    """Keep float16/bfloat16/float32 as they are; store any other float as float32."""
    return t if t.dtype in BUNDLE_FLOAT_DTYPES else t.to(torch.float32)


def load_tensor_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a safetensors or torch file, never executing code.

    Torch files go through `torch.load(weights_only=True)`, whose unpickler only rebuilds
    tensors and plain containers, so a checkpoint carrying any other object is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    with path.open("rb") as fh:
        magic = fh.read(2)
    if path.suffix == ".safetensors" or (path.suffix not in (".bin", ".pt", ".pth") and magic not in (b"PK", b"\x80\x02")):
        try:
            return load_file(str(path))
        except Exception as exc:
            raise ConversionError(f"{path}: not a valid safetensors file ({exc})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for a disallowed global, RuntimeError for junk
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(
            f"{path}: refused by torch.load(weights_only=True); only plain tensor dicts are accepted "
            f"(convert the checkpoint to safetensors): {first}"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: entries that are not tensors: {', '.join(bad[:10])}")
    return dict(obj)


def read_base_tensors(source: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Named tensors of a base model's safetensors weights (one file or shards), read alone.

    `source` is a model folder or an id in the local Hugging Face cache (nothing is
    downloaded). Each name is also looked up under every backbone prefix (`bert.` ...), as a
    checkpoint saved from a task model stores it. ConversionError if a name is missing.
    """
    folder = Path(source)
    if not folder.is_dir():
        try:
            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception:
            raise ConversionError(f"base model {source!r} is neither a folder nor in the local model cache") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text()).get("weight_map", {})
    elif (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise ConversionError(f"base model {source!r}: no model.safetensors in {folder}")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        key = next((k for k in (name, *(f"{p}.{name}" for p in ENCODER_BACKBONES)) if k in weight_map), None)
        if key is None:
            raise ConversionError(f"base model {source!r} has no tensor {name!r}")
        with safe_open(str(folder / weight_map[key]), framework="pt") as f:
            out[name] = f.get_tensor(key)
    return out


def validated(bundle: AdapterBundle) -> AdapterBundle:
    """Serialize and read back through `adapters.validation`: an importer hands out only
    bundles that `load_bundle` would accept (names, shapes, dtypes, metadata, NaN/Inf)."""

    tensors = {k: v.detach().contiguous().cpu() for k, v in bundle.tensors().items()}
    try:
        return load_bundle(save(tensors, metadata=bundle.metadata.to_header()))
    except BundleError as exc:
        raise ConversionError(exc.problems) from None
