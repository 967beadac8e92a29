"""What activating a compactly held adapter costs: mask generation or unpacking, stacking, merging.

An adapter cache that holds what a bundle holds (factors plus bit-packed masks, or for a
`seed` bundle the factors alone) builds the swap's form when the adapter is activated. This
times each step per adapter on MiniLM's query/value targets (rank 8, d 2..4, 384x384 each,
12 targets) on this machine's CPU: generating the masks from the seed against unpacking
packed bits, beside building and the swap itself in both forms, and prints the bytes each
held form takes, so the README can say which form to hold and whether built forms are worth
caching:

    python loadtest/bench_activation.py [--repeat 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from statistics import median

import torch

from adapters.bundle import Task
from adapters.default_model import DEFAULT_MODEL_ID, default_model_dir
from adapters.masks import mask_shape, seed_mask, unpack
from adapters.merge import add_dense_into, merge_into
from adapters.synthetic import random_bundle
from serving.engine.adapter_cache import build_pairs, compact_target, dense_of
from adapters.tasks.model_loader import meta_spec


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median milliseconds of `fn` over `repeat` runs (after one warm-up)."""
    fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return 1000 * median(runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (an engine worker runs with 1 on a CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = meta_spec(default_model_dir(), DEFAULT_MODEL_ID)
    targets = [n for n in spec.linear_shapes if n.endswith(("attention.self.query", "attention.self.value"))]
    print(f"{len(targets)} targets, rank 8, torch threads {args.threads}; milliseconds per adapter (median of {args.repeat})")
    print(
        "| d | held KiB: seed (factors) | held KiB: packed (factors + bits) | dense bool masks KiB "
        "| masks: seed generate | masks: unpack bits | build pairs (held form) | + dense delta "
        "| swap: dense add | swap: factors addmm |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d in (2, 3, 4):
        bundle = random_bundle(
            spec, targets, rank=8, num_copies=d, seed=d, task=Task.FEATURE_EXTRACTION, mask_encoding="seed", mask_seed=d
        )
        meta = bundle.metadata
        mask_seed, density = meta.mask_seed, meta.density
        assert mask_seed is not None
        scaling = meta.scaling
        shapes = {
            t: {m: mask_shape(m, d, 8, f.in_features, f.out_features) for m in ("A", "B")}
            for t, f in bundle.targets.items()
        }
        held = {t: compact_target(f) for t, f in bundle.targets.items()}
        bits = {t: (c.mask_A, c.mask_B) for t, c in held.items()}
        factors_kib = sum(f.lora_A.nbytes + f.lora_B.nbytes for f in bundle.targets.values()) / 1024
        bits_kib = sum(a.nbytes + b.nbytes for a, b in bits.values()) / 1024
        seed_ms = timed(
            lambda: [seed_mask(mask_seed, t, m, s, density) for t, ms in shapes.items() for m, s in ms.items()],
            args.repeat,
        )
        unpack_ms = timed(
            lambda: [unpack(bits[t][i], shapes[t][m]) for t in shapes for i, m in enumerate(("A", "B"))], args.repeat
        )
        weights = {t: torch.randn(spec.linear_shapes[t]) for t in targets}
        pristine = {t: w.clone() for t, w in weights.items()}
        pairs = build_pairs(held, scaling)
        built = {t: dense_of(p, held[t].transposed) for t, p in pairs.items()}
        bool_kib = sum(f.mask_A.numel() + f.mask_B.numel() for f in bundle.targets.values()) / 1024
        factors_ms = timed(lambda: build_pairs(held, scaling), args.repeat)
        dense_ms = timed(lambda: [dense_of(p, held[t].transposed) for t, p in build_pairs(held, scaling).items()], args.repeat)
        add_ms = timed(lambda: [add_dense_into(weights[t], pristine[t], b.dense) for t, b in built.items()], args.repeat)
        addmm_ms = timed(lambda: [merge_into(weights[t], pristine[t], p.b, p.a) for t, p in pairs.items()], args.repeat)
        print(
            f"| {d} | {factors_kib:.0f} | {factors_kib + bits_kib:.0f} | {bool_kib:.0f} | {seed_ms:.2f} | {unpack_ms:.2f} "
            f"| {factors_ms:.2f} | {dense_ms:.2f} | {add_ms:.2f} | {addmm_ms:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
