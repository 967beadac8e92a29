"""Import a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) as a bundle.

A LoRA is the CapaBoost case d = 1 with all-true masks. What PEFT's config changes:

- scaling: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`; the bundle has
  one `alpha` with scaling `alpha / rank`, so we store `alpha = scaling * rank`.
- `rank_pattern` / `alpha_pattern` give some targets another r or alpha. The bundle has
  one rank and one scaling, so such a target is padded with zero rows/columns up to the
  largest r (zeros add nothing to B @ A) and its B is multiplied by
  `scaling_target / scaling_default` in float32, the bundle keeping the default
  (r, lora_alpha) scaling: the merged delta is the same.
- `fan_in_fan_out` (GPT-2's Conv1D stores W as [in, out]): PEFT still keeps lora_A as
  [r, in] and lora_B as [out, r] and transposes only the product, which is exactly the
  bundle's orientation, so the factors are taken as they are.

Task heads. `modules_to_save` is how PEFT keeps a trained head (SEQ_CLS adds
`classifier` and `score`, QUESTION_ANS `qa_outputs`; image classifiers list `classifier`
by hand). A saved head becomes the bundle's head as `adapters.importers.heads` maps it;
labels come from `labels`, else from the `id2label` of a `config.json` saved beside the
adapter (`model.config.save_pretrained(folder)`), else transformers' defaults `LABEL_i`.
Without `task` or a known `task_type`, the head decides it: `qa_outputs` is
question-answering, `classifier` image-classification on an image backbone (`vit.`,
`deit.`) and sequence-classification otherwise. A head BERT's classifier needs from the
base (its pooler) is read from the base model's weights.

Anything else that is not a plain additive LoRA (DoRA, LoRA bias, trained biases, other
saved modules, embedding or parameter targets, aLoRA, ...) is refused, naming the
setting. adapter_model.bin (a pickle) is never opened.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file

from adapters.bundle import CLASSIFICATION_TASKS, AdapterBundle, BundleMetadata, Task, TargetFactors
from adapters.default_model import DEFAULT_MODEL_ID, default_model_dir
from adapters.importers.common import (
    ENCODER_BACKBONES,
    ConversionError,
    PrefixMap,
    bundle_dtype,
    natural_key,
    read_base_tensors,
    validated,
)
from adapters.importers.heads import HEAD_MODULES, IMAGE_BACKBONES, SavedHead, map_head, task_of
from adapters.merge import delta_weight

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

#: PEFT task_type -> bundle task.
PEFT_TASKS = {
    "FEATURE_EXTRACTION": Task.FEATURE_EXTRACTION,
    "CAUSAL_LM": Task.CAUSAL_LM,
    "SEQ_CLS": Task.SEQUENCE_CLASSIFICATION,
    "QUESTION_ANS": Task.QUESTION_ANSWERING,
}

#: Config settings whose non-empty value means the adapter is more than W + s * B @ A.
UNSUPPORTED_SETTINGS = (
    "use_dora",
    "lora_bias",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "alora_invocation_tokens",
    "arrow_config",
    "use_qalora",
    "use_bdlora",
    "kasa_config",
    "velora_config",
    "monteclora_config",
)

#: init_lora_weights values that leave the base weights and the forward untouched. PiSSA,
#: OLoRA, CorDA, LoRA-GA and LoftQ subtract their init from the base weights (PEFT stores
#: True once converted with path_initial_model_for_weight_conversion); MiCA is a variant.
PLAIN_INITS = {"true", "false", "gaussian", "eva", "orthogonal"}

# `base_model.model.` is what PeftModel.save_pretrained writes; transformers' own PEFT
# integration saves the same keys without it.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<factor>[AB])\.weight$")
#: Where BERT's classifier reads from: the backbone's pooler, saved or taken from the base.
POOLER = "pooler.dense"


class PeftLoraConfig(BaseModel):
    """The part of PEFT's LoraConfig that decides the delta; other keys are checked by name."""

    model_config = ConfigDict(extra="allow")

    peft_type: str = Field("LORA", description="Must be LORA.")
    task_type: str | None = Field(None, description="PEFT task; maps to the bundle task.")
    base_model_name_or_path: str | None = Field(None, description="Default for the bundle's base_model.")
    r: int = Field(..., ge=1, description="Default rank.")
    lora_alpha: float = Field(..., description="Default alpha.")
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) instead of alpha / r.")
    fan_in_fan_out: bool = Field(False, description="Base weight stored [in, out] (Conv1D); factors are not.")
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="Per-module rank overrides.")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="Per-module alpha overrides.")
    bias: str = Field("none", description="Must be none: trained biases are not part of a bundle.")
    modules_to_save: list[str] | None = Field(None, description="Modules trained and saved whole: the task head.")

    def _pattern(self, patterns: dict[str, Any], module: str) -> Any | None:
        # PEFT's own rule (peft.utils.other.get_pattern_key): the first key K with
        # re.match(rf"(.*\.)?({K})$", module), tried in the config's order.
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return None

    def rank_for(self, module: str) -> int:
        r = self._pattern(self.rank_pattern, module)
        return self.r if r is None else int(r)

    def scaling_for(self, module: str, r: int) -> float:
        alpha = self._pattern(self.alpha_pattern, module)
        alpha = self.lora_alpha if alpha is None else float(alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def read_peft_config(folder: Path) -> PeftLoraConfig:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ConversionError(f"{folder}: no {CONFIG_NAME}; not a PEFT adapter folder")
    try:
        raw = json.loads(path.read_text())
        config = PeftLoraConfig.model_validate(raw)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: not JSON ({exc})") from None
    except ValidationError as exc:
        raise ConversionError([f"{path}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
    problems = []
    extra = config.model_extra or {}
    if config.peft_type.upper() != "LORA":
        problems.append(f"peft_type is {config.peft_type!r}; only LORA adapters can be imported")
    init = str(extra.get("init_lora_weights", True)).lower()
    if init not in PLAIN_INITS:
        problems.append(
            f"init_lora_weights={init!r} changes the base weights; convert the adapter first with "
            f"save_pretrained(..., path_initial_model_for_weight_conversion=...)"
        )
    if config.bias != "none":
        problems.append(f"bias={config.bias!r} trains base biases, which a bundle cannot carry; expected 'none'")
    for key in UNSUPPORTED_SETTINGS:
        if extra.get(key):
            problems.append(f"{key}={extra[key]!r} is not supported (a bundle is a plain additive LoRA)")
    if problems:
        raise ConversionError(problems)
    return config


def import_peft(
    folder: str | os.PathLike[str],
    *,
    base_model: str | None = None,
    task: Task | str | None = None,
    prefix_map: PrefixMap | None = None,
    description: str | None = None,
    labels: list[str] | None = None,
    base_weights: str | None = None,
    fallback_task: Task | None = None,
) -> AdapterBundle:
    """Read a PEFT LoRA folder into a validated d = 1 bundle; ConversionError lists all problems.

    `base_model` and `task` override adapter_config's `base_model_name_or_path` and
    `task_type`; `prefix_map` overrides `PrefixMap.default(task)`; `labels` the label names
    of a classification head. `base_weights` (a folder or cached id) is where a head that
    reads the base's own weights (BERT's pooler) takes them from; by default the base model.
    `fallback_task` is taken when neither `task`, `task_type` nor a saved head tells the task.
    An explicit `task` without a head (feature-extraction, causal-lm) leaves a saved head out.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a folder")
    config = read_peft_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / PICKLE_NAME).is_file():
            raise ConversionError(
                f"{folder}: only {PICKLE_NAME} found; it is a pickle and capaserve never loads pickles from a "
                f"PEFT folder. Re-save with model.save_pretrained(folder, safe_serialization=True)"
            )
        raise ConversionError(f"{folder}: no {WEIGHTS_NAME}")
    base = base_model or config.base_model_name_or_path
    if not base:
        raise ConversionError("no base model: adapter_config.json has no base_model_name_or_path; pass base_model")

    try:
        tensors = load_file(str(weights))
    except Exception as exc:
        raise ConversionError(f"{weights}: not a valid safetensors file ({exc})") from None
    tensors, saved, problems = _split_saved(tensors, config)
    factors, more = _collect_factors(tensors, config)
    problems += more
    if problems:
        raise ConversionError(problems)
    if not factors:
        raise ConversionError(f"{weights}: holds no lora_A / lora_B weights")
    backbone = _backbone(factors)
    head = saved.pop("head", None)
    task = _resolve_task(task, config, head, backbone, fallback_task)

    rank = max(a.shape[0] for a, _, _ in factors.values())
    # the config's default scaling (r, lora_alpha); only pattern-matched targets are rescaled
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    paths = (prefix_map or PrefixMap.default(task)).map_all(sorted(factors, key=natural_key))
    targets = {paths[p]: _as_target(*factors[p], rank=rank, scaling=scaling) for p in paths}
    uniform = all(a.shape[0] == rank and s == scaling for a, _, s in factors.values())
    notes = [] if uniform else ["rank/alpha patterns folded into zero-padded factors"]

    head_tensors: dict[str, torch.Tensor] = {}
    pooling, label_names = None, None
    if task in CLASSIFICATION_TASKS or task is Task.QUESTION_ANSWERING:
        if head is None:
            wanted = "qa_outputs" if task is Task.QUESTION_ANSWERING else "classifier"
            raise ConversionError(
                f"task {task.value} needs its head saved through modules_to_save ({wanted!r}); {weights} holds no head"
            )

        def pooler() -> tuple[torch.Tensor, torch.Tensor]:
            pooler_target = paths.get(f"{backbone}.{POOLER}")
            return _pooler(saved.get("pooler"), targets.get(pooler_target or ""), scaling, base_weights, base, config)

        mapped = map_head(head, task, backbone, pooler)
        head_tensors = {k: bundle_dtype(v).contiguous() for k, v in mapped.tensors.items()}
        pooling = mapped.pooling
        if mapped.num_labels is not None:
            label_names, where = _labels(folder, labels, mapped.num_labels)
            notes.append(f"head {head.module!r} of a {backbone} model, labels {where}")
        else:
            notes.append(f"head {head.module!r}")
    elif head is not None:
        notes.append(f"saved head {head.module!r} left out (task {task.value})")
    note = f" ({'; '.join(notes)})" if notes else ""
    meta = BundleMetadata(
        base_model=base,
        task=task,
        rank=rank,
        num_copies=1,
        alpha=scaling * rank,
        density=1.0,
        targets=list(targets),
        labels=label_names,
        pooling=pooling,  # type: ignore[arg-type] - "cls" or None, checked by BundleMetadata
        description=description or f"imported from PEFT LoRA {folder.name}{note}",
    )
    return validated(AdapterBundle(metadata=meta, targets=targets, head=head_tensors))


def _resolve_task(
    task: Task | str | None,
    config: PeftLoraConfig,
    head: SavedHead | None,
    backbone: str | None,
    fallback: Task | None,
) -> Task:
    if task is not None:
        return Task(task)
    kind = config.task_type
    if kind in PEFT_TASKS:
        found = PEFT_TASKS[kind]
        if found is Task.SEQUENCE_CLASSIFICATION and backbone in IMAGE_BACKBONES:
            return Task.IMAGE_CLASSIFICATION  # SEQ_CLS on a ViT: PEFT has no image task type
        return found
    if kind is not None and (head is not None or fallback is None):
        raise ConversionError(f"PEFT task_type {kind!r} has no bundle task; pass the task")
    if head is not None:
        return task_of(head, backbone)
    if fallback is None:
        raise ConversionError("adapter_config.json has no task_type; pass the task")
    return fallback


def _split_saved(
    tensors: dict[str, torch.Tensor], config: PeftLoraConfig
) -> tuple[dict[str, torch.Tensor], dict[str, SavedHead], list[str]]:
    """(LoRA tensors, saved modules by role, problems). A tensor inside a module named in
    modules_to_save (PEFT's rule: the module path is, or ends in `.`, the name) belongs to
    a head (`head`: classifier, qa_outputs, score) or to BERT's pooler (`pooler`); any
    other saved module is a problem naming it."""
    wanted = config.modules_to_save or []
    rest: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module = None if _KEY.match(key) else _saved_module(key.removeprefix("base_model.model."), wanted)
        if module is None:
            rest[key] = t
        else:
            modules.setdefault(module, {})[key.removeprefix("base_model.model.")[len(module) + 1 :]] = t
    heads: dict[str, SavedHead] = {}
    saved: dict[str, SavedHead] = {}
    problems: list[str] = []
    for module, params in sorted(modules.items()):
        top, _, sub = module.partition(".")
        if top in HEAD_MODULES and not sub:
            heads[top] = SavedHead(top, params)
        elif top in ENCODER_BACKBONES and sub in ("pooler", POOLER):
            prefix = "" if sub == POOLER else "dense."
            saved["pooler"] = SavedHead(POOLER, {k.removeprefix(prefix): v for k, v in params.items()})
        else:
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(params.items()))
            problems.append(
                f"modules_to_save saved {module!r} ({shapes}): a bundle carries no trained module but a task head "
                f"({', '.join(HEAD_MODULES)})"
            )
    if len(heads) > 1:
        problems.append(f"modules_to_save saved more than one head: {sorted(heads)}")
    elif heads:
        saved["head"] = next(iter(heads.values()))
    elif "pooler" in saved:
        problems.append("modules_to_save saved the pooler but no head: only BERT's classifier reads it")
    return rest, saved, problems


def _saved_module(path: str, wanted: list[str]) -> str | None:
    """The module of tensor `path` that modules_to_save names (the shortest such), if any."""
    parts = path.split(".")
    for k in range(1, len(parts)):
        module = ".".join(parts[:k])
        if any(module == w or module.endswith("." + w) for w in wanted):
            return module
    return None


def _backbone(factors: dict[str, Any]) -> str | None:
    """The task model's backbone prefix (`bert`, `vit`, ...) shared by every LoRA path, if any."""
    firsts = {p.split(".", 1)[0] for p in factors}
    return firsts.pop() if len(firsts) == 1 and firsts <= set(ENCODER_BACKBONES) else None


def _pooler(
    saved: SavedHead | None,
    lora: TargetFactors | None,
    scaling: float,
    base_weights: str | None,
    base: str,
    config: PeftLoraConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's pooler dense layer as the served base computes it: saved by PEFT, or the base
    model's own weights plus this adapter's LoRA delta on it (a `dense` target hits it)."""
    if saved is not None:
        return saved.tensors["weight"], saved.tensors["bias"]
    source = base_weights or next(
        (s for s in (base, config.base_model_name_or_path) if s and Path(s).is_dir()),
        default_model_dir() if base == DEFAULT_MODEL_ID else base,
    )
    try:
        got = read_base_tensors(source, [f"{POOLER}.weight", f"{POOLER}.bias"])
    except ConversionError as exc:
        raise ConversionError(
            f"BERT's classifier reads the base model's pooler ({POOLER} then tanh), whose weights are not in "
            f"the PEFT folder and could not be read: {'; '.join(exc.problems)}. Give the base model's folder "
            "(capaserve pack peft --check-base DIR)"
        ) from None
    weight, bias = got[f"{POOLER}.weight"].to(torch.float32), got[f"{POOLER}.bias"].to(torch.float32)
    if lora is not None:
        weight = weight + delta_weight(lora, scaling)
    return weight, bias


def _labels(folder: Path, given: list[str] | None, n: int) -> tuple[list[str], str]:
    """(label names, where they came from): `given`, else config.json's id2label, else LABEL_i."""
    if given:
        if len(given) != n:
            raise ConversionError(f"{len(given)} labels given but the head has {n} outputs")
        return list(given), "as given"
    path = folder / "config.json"
    if path.is_file():
        try:
            id2label = json.loads(path.read_text()).get("id2label") or {}
            names = [str(id2label[str(i)]) for i in range(n)] if len(id2label) == n else None
        except (json.JSONDecodeError, KeyError, AttributeError):
            names = None
        if names is None:
            raise ConversionError(f"{path}: id2label does not name the head's {n} labels 0..{n - 1}; pass the labels")
        return names, "from config.json"
    return [f"LABEL_{i}" for i in range(n)], "LABEL_i (no config.json with id2label)"


def _collect_factors(
    tensors: dict[str, torch.Tensor], config: PeftLoraConfig
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], list[str]]:
    """module path -> (A [r, in], B [out, r], scaling), checking every key and shape."""
    problems: list[str] = []
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            hint = ""
            if "lora_embedding" in key:
                hint = " (embedding LoRA is not supported)"
            elif "lora_magnitude_vector" in key:
                hint = " (DoRA is not supported)"
            problems.append(f"unexpected tensor {key!r}{hint}")
            continue
        halves.setdefault(m["path"], {})[m["factor"]] = t
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for path, ab in halves.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            problems.append(f"module {path!r}: missing {missing}")
            continue
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(
                f"module {path!r}: expected lora_A [r, in] and lora_B [out, r], got {list(a.shape)} and {list(b.shape)}"
            )
            continue
        if not (a.is_floating_point() and b.is_floating_point()):
            problems.append(f"module {path!r}: weights must be floating point, got {a.dtype} and {b.dtype}")
            continue
        r = a.shape[0]
        if r != config.rank_for(path):
            problems.append(f"module {path!r}: adapter_config gives rank {config.rank_for(path)}, weights have {r}")
            continue
        out[path] = (a, b, config.scaling_for(path, r))
    return out, problems


def _as_target(a: torch.Tensor, b: torch.Tensor, scaling_t: float, *, rank: int, scaling: float) -> TargetFactors:
    """One d = 1 target with all-true masks, padded to `rank` and rescaled to `scaling` if needed."""
    r = a.shape[0]
    if r != rank or scaling_t != scaling:
        a32, b32 = a.to(torch.float32), b.to(torch.float32) * (scaling_t / scaling)
        a = torch.cat([a32, a32.new_zeros(rank - r, a32.shape[1])], dim=0)
        b = torch.cat([b32, b32.new_zeros(b32.shape[0], rank - r)], dim=1)
    a, b = bundle_dtype(a).contiguous(), bundle_dtype(b).contiguous()
    return TargetFactors(
        lora_A=a,
        lora_B=b,
        mask_A=torch.ones((1, *a.shape), dtype=torch.bool),
        mask_B=torch.ones((1, *b.shape), dtype=torch.bool),
    )
