"""`capaserve inspect BUNDLE [--json]`: validate a bundle and show what it holds.

Besides metadata and size, it prints per target the shapes and the numerical rank of
delta_W (`adapters.merge.rank_of`): a plain LoRA stays at or below r, and the rank above r
is the extra capacity the d masked copies of CapaBoost buy (at most d*r). It shows how the
masks are stored (dense, packed or seed) and the bytes that saves against bool masks. An
invalid bundle prints every problem and exits with status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from adapters.errors import BundleError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="Validate a bundle; show metadata, sizes and the rank of each delta_W.")
    p.add_argument("bundle", help="Path to a capaboost.v1 .safetensors bundle.")
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    p.set_defaults(func=run)


def describe(path: str) -> dict[str, Any]:
    """Everything inspect reports, as plain data; raises BundleError for an invalid bundle."""
    # deferred: only this subcommand pays for torch (`capaserve --help` stays fast)
    from adapters.masks import mask_bytes
    from adapters.merge import rank_of
    from adapters.validation import load_bundle

    data = Path(path).read_bytes()
    bundle = load_bundle(data)
    meta = bundle.metadata
    targets = []
    for name, f in bundle.targets.items():
        targets.append(
            {
                "name": name,
                "out_features": f.out_features,
                "in_features": f.in_features,
                "dtype": str(f.lora_A.dtype).removeprefix("torch."),
                "mask_density": round(float(f.mask_A.float().mean() + f.mask_B.float().mean()) / 2, 4),
                "delta_rank": rank_of(f, meta.scaling),
                "max_rank": min(meta.num_copies * meta.rank, f.out_features, f.in_features),
            }
        )
    shapes = bundle.mask_shapes()
    stored, dense = mask_bytes(meta.encoding, shapes), mask_bytes("dense", shapes)
    return {
        "path": str(path),
        "mask_encoding": meta.encoding,
        "mask_bytes": stored,
        "dense_mask_bytes": dense,
        "mask_bytes_saved": dense - stored,
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "tensor_bytes": bundle.nbytes(),
        "metadata": meta.model_dump(mode="json", exclude_none=True),
        "scaling": meta.scaling,
        "targets": targets,
        "head": {k: list(v.shape) for k, v in bundle.head.items()},
    }


def run(args: argparse.Namespace) -> int:
    try:
        info = describe(args.bundle)
    except FileNotFoundError:
        print(f"error: {args.bundle}: no such file", file=sys.stderr)
        return 1
    except BundleError as exc:
        print(f"error: {args.bundle} is not a valid bundle:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    _print_table(info)
    return 0


def _print_table(info: dict[str, Any]) -> None:
    m = info["metadata"]
    print(f"{info['path']}  {info['size_bytes']} bytes  sha256 {info['sha256']}")
    for key in ("format", "base_model", "task", "rank", "num_copies", "alpha", "density", "labels", "pooling"):
        if key in m:
            print(f"  {key:<12} {m[key]}")
    print(f"  {'scaling':<12} {info['scaling']:g}")
    seed = f", mask_seed {m['mask_seed']}" if "mask_seed" in m else ""
    print(
        f"  {'masks':<12} {info['mask_encoding']}{seed}: {info['mask_bytes']} bytes, "
        f"{info['mask_bytes_saved']} saved vs {info['dense_mask_bytes']} as bool masks"
    )
    if m.get("description"):
        print(f"  {'description':<12} {m['description']}")
    targets = info["targets"]
    width = max(len("target"), *(len(t["name"]) for t in targets))
    print()
    print(f"  {'target':<{width}}  {'out x in':>11}  {'dtype':<8}  {'rank(dW)':>8}  {'max':>4}")
    for t in targets:
        shape = f"{t['out_features']} x {t['in_features']}"
        print(f"  {t['name']:<{width}}  {shape:>11}  {t['dtype']:<8}  {t['delta_rank']:>8}  {t['max_rank']:>4}")
    ranks = [t["delta_rank"] for t in targets]
    r = m["rank"]
    print(
        f"\n  {len(targets)} targets; rank(delta_W) {min(ranks)}..{max(ranks)} "
        f"(r = {r}, up to d*r = {m['num_copies'] * r}; {sum(x > r for x in ranks)} above r)"
    )
    for name, shape in info["head"].items():
        print(f"  {name}: {shape}")
