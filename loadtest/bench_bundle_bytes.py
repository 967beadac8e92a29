"""Bundle bytes per mask encoding against a PEFT LoRA of the same rank, targets and dtype.

For all-MiniLM-L6-v2, query and value targets, rank 8, d in {2, 4} and float16 / float32
factors, it writes a `seed`, a `packed` and a `dense` bundle of one random adapter, and the
`adapter_model.safetensors` that PEFT's own `save_pretrained` writes for a LoRA of the same
rank, targets and dtype, and prints the file sizes and their ratios to the PEFT file.
Goals: seed <= 1.01x PEFT; packed <= 1.15x at d <= 4 with float16 factors.

Packed masks are d*r*(in+out) bits a target, the factors r*(in+out) numbers: packed / PEFT
is about 1 + d/16 with float16 factors and 1 + d/32 with float32, whatever the model.
Random masks of density 0.5 carry one bit of information an element, so no lossless
explicit encoding is smaller; only `seed` stores them in (almost) nothing.

    python loadtest/bench_bundle_bytes.py [--out FILE.md] [--random-minilm]

Sizes are exact byte counts (no timing), so one run is the measurement.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from adapters.bundle import Task, save_bundle
from adapters.default_model import DEFAULT_MODEL_ID, default_model_dir
from adapters.synthetic import random_bundle
from adapters.validation import BaseModelSpec

TARGETS = ("query", "value")
RANK = 8
COPIES = (2, 4)
DTYPES = {"float16": torch.float16, "float32": torch.float32}
SEED_GOAL, PACKED_GOAL = 1.01, 1.15


def minilm(random_weights: bool) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel

    src = default_model_dir()
    if random_weights:
        return AutoModel.from_config(AutoConfig.from_pretrained(src)).eval()
    return AutoModel.from_pretrained(src, local_files_only=True).eval()


def peft_bytes(model: torch.nn.Module, dtype: torch.dtype, folder: Path) -> int:
    """Size of the adapter_model.safetensors PEFT saves for a rank-8 LoRA on query, value in `dtype`."""
    import copy

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=RANK, lora_alpha=16, target_modules=list(TARGETS)))
    lora.to(dtype)
    lora.save_pretrained(str(folder))
    return (folder / "adapter_model.safetensors").stat().st_size


def measure(model: torch.nn.Module, folder: Path) -> list[dict[str, object]]:
    spec = BaseModelSpec.from_model(DEFAULT_MODEL_ID, Task.FEATURE_EXTRACTION, model, model.config.hidden_size)
    targets = [n for n in spec.linear_shapes if n.endswith(tuple(f".{t}" for t in TARGETS))]
    rows = []
    for dname, dtype in DTYPES.items():
        peft = peft_bytes(model, dtype, folder / f"peft-{dname}")
        for d in COPIES:
            seeded = random_bundle(spec, targets, rank=RANK, num_copies=d, dtype=dtype, mask_encoding="seed", mask_seed=1)
            sizes = {}
            for enc in ("seed", "packed", "dense"):
                b = seeded if enc == "seed" else seeded.with_encoding(enc)  # type: ignore[arg-type]
                sizes[enc] = save_bundle(b, folder / f"{dname}-d{d}-{enc}.safetensors").stat().st_size
            rows.append({"dtype": dname, "d": d, "peft": peft, **sizes})
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        f"MiniLM (all-MiniLM-L6-v2), targets query+value (12 layers), rank {RANK}; bytes of the whole file.",
        "",
        "| factors | d | PEFT LoRA | seed | packed | dense | seed / PEFT | packed / PEFT | dense / PEFT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = int(r["peft"])  # type: ignore[arg-type]
        ratios = [int(r[k]) / p for k in ("seed", "packed", "dense")]  # type: ignore[arg-type]
        lines.append(
            f"| {r['dtype']} | {r['d']} | {p} | {r['seed']} | {r['packed']} | {r['dense']} | "
            + " | ".join(f"{x:.3f}" for x in ratios) + " |"
        )
    lines += [
        "",
        f"Goals: seed / PEFT <= {SEED_GOAL}; packed / PEFT <= {PACKED_GOAL} at d <= 4 with float16 factors.",
        "Packed masks add d bits per factor element: packed / PEFT >= 1 + d/16 (float16), 1 + d/32 (float32).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    ap.add_argument("--random-minilm", action="store_true", help="MiniLM's shape with random weights (no package)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(minilm(args.random_minilm), Path(tmp))
    out = table(rows)
    print(out)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(out + "\n")
    seed_ok = all(int(r["seed"]) <= SEED_GOAL * int(r["peft"]) for r in rows)  # type: ignore[arg-type]
    print(f"\nseed goal {'met' if seed_ok else 'NOT met'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
