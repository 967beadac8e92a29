"""Import a checkpoint of the CapaBoost reference code (adapter-transformers layout).

The reference code stores, for every target `<module>` and adapter `<name>`, the d masked
copies it multiplies, each already masked:

    <module>.loras.<name>.lora_A.<i>.weight   [in, r]   = (A * M_A[i])^T
    <module>.loras.<name>.lora_B.<i>.weight   [r, out]  = (B * M_B[i])^T

and its forward adds `(alpha / r) * sum_i x @ A_i @ B_i`. The shared factors and masks
are recovered per entry: mask[i] = (copy_i != 0), shared = the value of any copy where
its mask is set (the copies must agree there, being one parameter seen through d masks),
0 where no copy is nonzero. Then `B * M_B[i]` and `A * M_A[i]` equal the stored copies bit
for bit, so `adapters.merge` gives exactly the reference update.

Caveat: a trained value that is exactly 0.0 inside a mask loses its mask bit (and an
untrained all-zero B loses all of them). It contributes 0 either way, so serving is
exact, but the recovered masks are not the training masks: do not resume training
from them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.bundle import AdapterBundle, BundleMetadata, Task, TargetFactors
from adapters.importers.common import (
    ConversionError,
    PrefixMap,
    bundle_dtype,
    load_tensor_file,
    natural_key,
    validated,
)

log = logging.getLogger(__name__)

_KEY = re.compile(r"^(?P<module>.+)\.loras\.(?P<name>[^.]+)\.lora_(?P<factor>[AB])\.(?P<i>\d+)(?:\.weight)?$")


class ReferenceConfig(BaseModel):
    """alpha and r of a reference adapter: read from its JSON config, overridden by flags.

    Accepts the keys at the top level or under `config` (adapter-transformers'
    adapter_config.json); `lora_alpha` and `rank` are read as aliases.
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    r: int = Field(..., ge=1, description="Rank r of the shared factors.")
    alpha: float = Field(..., description="Scaling is alpha / r.")
    name: str | None = Field(None, description="Adapter name inside the checkpoint (`loras.<name>`).")
    density: float | None = Field(None, gt=0.0, le=1.0, description="Mask density, informational.")

    @classmethod
    def from_sources(
        cls,
        config_path: str | os.PathLike[str] | None = None,
        *,
        alpha: float | None = None,
        rank: int | None = None,
        name: str | None = None,
        density: float | None = None,
    ) -> "ReferenceConfig":
        raw: dict[str, object] = {}
        if config_path is not None:
            try:
                data = json.loads(Path(config_path).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConversionError(f"{config_path}: cannot read the JSON config ({exc})") from None
            if isinstance(data, dict) and isinstance(data.get("config"), dict):
                data = {**data, **data["config"]}
            if not isinstance(data, dict):
                raise ConversionError(f"{config_path}: expected a JSON object")
            for key, aliases in (("r", ("r", "rank")), ("alpha", ("alpha", "lora_alpha")), ("name", ("name",))):
                for a in aliases:
                    if data.get(a) is not None:
                        raw[key] = data[a]
                        break
            for a in ("density", "mask_density"):
                if isinstance(data.get(a), (int, float)):
                    raw["density"] = data[a]
                    break
        for key, value in (("r", rank), ("alpha", alpha), ("name", name), ("density", density)):
            if value is not None:
                raw[key] = value
        missing = [k for k in ("r", "alpha") if k not in raw]
        if missing:
            raise ConversionError(f"reference import needs {' and '.join(missing)} (from the config file or flags)")
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as exc:
            raise ConversionError([f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
        if cfg.alpha != cfg.alpha or abs(cfg.alpha) == float("inf"):
            raise ConversionError("alpha must be a finite number")
        return cfg


def import_reference(
    checkpoint: str | os.PathLike[str],
    config: ReferenceConfig,
    *,
    base_model: str,
    task: Task | str,
    prefix_map: PrefixMap | None = None,
    description: str | None = None,
) -> AdapterBundle:
    """Read a reference checkpoint (.safetensors, or .bin/.pt via weights_only) into a bundle.

    Tensors that are not `.loras.` weights (base weights, heads) are ignored and logged.
    """
    task = Task(task)
    if task is Task.SEQUENCE_CLASSIFICATION:
        raise ConversionError("the reference importer does not carry a classification head; use feature-extraction")
    tensors = load_tensor_file(checkpoint)
    groups: dict[str, dict[str, dict[str, dict[int, torch.Tensor]]]] = {}
    ignored = 0
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            ignored += 1
            continue
        groups.setdefault(m["name"], {}).setdefault(m["module"], {"A": {}, "B": {}})[m["factor"]][int(m["i"])] = t
    if ignored:
        log.info("ignored %d tensors that are not CapaBoost LoRA copies", ignored)
    if not groups:
        raise ConversionError(f"{checkpoint}: no `<module>.loras.<name>.lora_A.<i>.weight` tensors found")
    name = config.name
    if name is None:
        if len(groups) > 1:
            raise ConversionError(f"{checkpoint}: holds adapters {sorted(groups)}; choose one by name")
        name = next(iter(groups))
    if name not in groups:
        raise ConversionError(f"{checkpoint}: no adapter {name!r}; found {sorted(groups)}")

    modules = groups[name]
    problems: list[str] = []
    recovered: dict[str, TargetFactors] = {}
    copies_seen: set[int] = set()
    for module in sorted(modules, key=natural_key):
        try:
            recovered[module] = _recover(module, modules[module], config.r)
            copies_seen.add(recovered[module].mask_A.shape[0])
        except ConversionError as exc:
            problems.extend(exc.problems)
    if len(copies_seen) > 1:
        problems.append(f"targets disagree on the number of copies: {sorted(copies_seen)}")
    if problems:
        raise ConversionError(problems)

    paths = (prefix_map or PrefixMap.default(task)).map_all(recovered)
    targets = {paths[m]: f for m, f in recovered.items()}
    density = config.density
    if density is None:
        kept = sum(int(f.mask_A.sum()) + int(f.mask_B.sum()) for f in targets.values())
        total = sum(f.mask_A.numel() + f.mask_B.numel() for f in targets.values())
        density = round(kept / total, 4)
        if density <= 0.0:
            raise ConversionError(f"{checkpoint}: every LoRA weight is zero")
    meta = BundleMetadata(
        base_model=base_model,
        task=task,
        rank=config.r,
        num_copies=copies_seen.pop(),
        alpha=config.alpha,
        density=density,
        targets=list(targets),
        description=description or f"imported from CapaBoost reference checkpoint {Path(checkpoint).name} ({name})",
    )
    return validated(AdapterBundle(metadata=meta, targets=targets))


def _recover(module: str, copies: dict[str, dict[int, torch.Tensor]], r: int) -> TargetFactors:
    """Shared factors and masks of one module from its stored masked copies."""
    a_idx, b_idx = sorted(copies["A"]), sorted(copies["B"])
    d = len(a_idx)
    if d == 0 or a_idx != list(range(d)) or b_idx != a_idx:
        raise ConversionError(
            f"module {module!r}: expected lora_A and lora_B copies 0..d-1, got A {a_idx} and B {b_idx}"
        )
    a_copies = [copies["A"][i] for i in a_idx]
    b_copies = [copies["B"][i] for i in b_idx]
    in_f = a_copies[0].shape[0] if a_copies[0].ndim == 2 else -1
    out_f = b_copies[0].shape[1] if b_copies[0].ndim == 2 else -1
    bad = [
        f"lora_{f}.{i} {list(t.shape)}"
        for f, ts, want in (("A", a_copies, (in_f, r)), ("B", b_copies, (r, out_f)))
        for i, t in enumerate(ts)
        if tuple(t.shape) != want or not t.is_floating_point()
    ]
    if bad:
        raise ConversionError(
            f"module {module!r}: expected float lora_A.<i> [in, r={r}] and lora_B.<i> [r={r}, out], got {', '.join(bad)}"
        )
    nonfinite = [
        f"lora_{f}.{i}"
        for f, ts in (("A", a_copies), ("B", b_copies))
        for i, t in enumerate(ts)
        if not bool(torch.isfinite(t).all())
    ]
    if nonfinite:
        raise ConversionError(f"module {module!r}: {', '.join(nonfinite)} hold NaN or Inf")
    shared_a, mask_a = _unmask(module, "A", torch.stack(a_copies))  # [in, r], [d, in, r]
    shared_b, mask_b = _unmask(module, "B", torch.stack(b_copies))  # [r, out], [d, r, out]
    return TargetFactors(
        lora_A=bundle_dtype(shared_a).t().contiguous(),
        lora_B=bundle_dtype(shared_b).t().contiguous(),
        mask_A=mask_a.transpose(1, 2).contiguous(),
        mask_B=mask_b.transpose(1, 2).contiguous(),
    )


def _unmask(module: str, factor: str, stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared, masks) from d masked copies [d, ...]: masks = copy != 0, shared = any set copy."""
    masks = stack != 0
    first = masks.to(torch.uint8).argmax(dim=0, keepdim=True)  # first copy holding each entry (0 if none)
    shared = stack.gather(0, first).squeeze(0)
    disagree = int((masks & (stack != shared.unsqueeze(0))).sum())
    if disagree:
        raise ConversionError(
            f"module {module!r}: the lora_{factor} copies disagree at {disagree} entries where both are nonzero, "
            f"so they are not masks of one shared weight (not a CapaBoost checkpoint?)"
        )
    return shared, masks
