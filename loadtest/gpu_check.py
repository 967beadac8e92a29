"""The merge and the swap on a GPU: exactness checks and timings, no Ray, nothing downloaded.

The CPU test suite proves the merge rule, in-place swaps and mixed batches on the CPU. This
script runs the same guarantees on a CUDA device, in float32 and bfloat16, on a random BERT
of all-MiniLM-L6-v2's shape (built from a config), and prints one line per check:

- merged forward equals a plain model whose target weights were replaced by hand with
  W' = W + (alpha/r) * sum_i (B*M_B[i]) @ (A*M_A[i]) (computed here in float32 from the
  bundle's tensors, cast to the model dtype), for a dense and a factors adapter;
- A -> B -> A gives bit-identical outputs, and activating the base restores every target
  weight bit for bit;
- a mixed batch (rows of A, B and the base, unmerged) equals each row's merged output;
- swap time over the time to copy the same bytes, dense and factors.

    python loadtest/gpu_check.py [--device cuda] [--dtypes float32,bfloat16]

Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from adapters.bundle import AdapterBundle, Task
from adapters.synthetic import random_bundle
from adapters.tasks.model_loader import finish
from serving.config import EngineConfig
from serving.engine.engine import Engine

TARGETS = ("attention.self.query", "attention.self.value", "intermediate.dense")
#: Largest |difference| allowed against the hand-merged model, per dtype (inputs differ by rounding only).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}


def hand_merged(model: torch.nn.Module, bundle: AdapterBundle) -> torch.nn.Module:
    """A copy of `model` with every target's weight replaced by W' computed from the bundle."""
    ref = copy.deepcopy(model)
    meta = bundle.metadata
    scale = meta.alpha / meta.rank
    for target, f in bundle.targets.items():
        lin = ref.get_submodule(target)
        a, b = f.lora_A.float().to(lin.weight.device), f.lora_B.float().to(lin.weight.device)
        ma, mb = f.mask_A.to(a.device), f.mask_B.to(a.device)
        delta = sum((b * mb[i]) @ (a * ma[i]) for i in range(meta.num_copies)) * scale
        with torch.no_grad():
            lin.weight.copy_((lin.weight.float() + delta).to(lin.weight.dtype))
    return ref


def check(dtype: torch.dtype, device: torch.device) -> list[tuple[str, bool, str]]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    model = BertModel(cfg).to(device=device, dtype=dtype).eval()
    pristine = copy.deepcopy(model)
    engine = Engine.from_loaded(finish(model, None, "random/minilm", Task.FEATURE_EXTRACTION),
                                EngineConfig(model="random/minilm"))
    targets = [n for n in engine.spec.linear_shapes if n.endswith(TARGETS)]
    bundles = {name: random_bundle(engine.spec, targets, seed=seed) for name, seed in (("A", 1), ("B", 2))}
    cache = engine.residency.cache
    cache.dense_budget = 1 << 50
    assert engine.load_adapter("A", bundles["A"]).mode == "dense"
    cache.dense_budget = 0
    assert engine.load_adapter("B", bundles["B"]).mode == "factors"
    ids = torch.randint(1000, cfg.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[3:, 17:] = 0  # padded rows too
    batch = {"input_ids": ids, "attention_mask": mask}

    def run(name: str | None) -> torch.Tensor:
        engine.activate(name)
        with torch.inference_mode():
            return model(**batch).last_hidden_state.clone()

    out: list[tuple[str, bool, str]] = []
    tol = TOLERANCE[dtype]
    outputs = {}
    ulp = torch.finfo(dtype).eps
    for name in ("A", "B"):
        got = run(name)
        ref = hand_merged(pristine, bundles[name])
        with torch.inference_mode():
            want = ref(**batch).last_hidden_state
        mode = engine.residency.cache.peek(name).mode
        # the weights: W' in the model dtype, within two units in the last place of the tensor's
        # largest entry (the two sides sum the masked products in another order)
        worst = max(
            float((model.get_submodule(t).weight.detach().float() - ref.get_submodule(t).weight.detach().float()).abs().max()
                  / ref.get_submodule(t).weight.detach().float().abs().max())
            for t in targets
        )
        out.append((f"merged {name} ({mode}) target weights = hand-merged W'", worst <= 2 * ulp,
                    f"max |diff| / max |W'| {worst:.1e} <= 2 ulp ({2 * ulp:.1e})"))
        diff = float((got.float() - want.float()).abs().max())
        out.append((f"merged {name} ({mode}) forward = hand-merged model", diff <= tol, f"max |diff| {diff:.2e} <= {tol:g}"))
        outputs[name] = got
    again = [run("A"), run("B"), run("A")]
    out.append(("A -> B -> A outputs bit-identical", torch.equal(again[0], again[2]) and torch.equal(again[0], outputs["A"]), ""))
    engine.activate(None)
    exact = all(torch.equal(model.get_submodule(t).weight, pristine.get_submodule(t).weight) for t in targets)
    out.append(("base restored bit-exactly after swaps", exact, f"{len(targets)} targets"))

    rows = ["A", None, "B", "A", "B", None]
    entries = [engine.residency.cache.peek(r) if r else None for r in rows]
    with engine.residency.unmerged(entries), torch.inference_mode():
        mixed = model(**batch).last_hidden_state
    base = run(None)
    refs = torch.stack([(outputs[r] if r else base)[i] for i, r in enumerate(rows)])
    diff = float((mixed.float() - refs.float()).abs().max())
    out.append(("mixed batch rows = their merged outputs", diff <= tol, f"max |diff| {diff:.2e} <= {tol:g}"))

    slots = engine.residency.bank._slots
    pairs = [(slots[t].weight, slots[t].pristine) for t in targets]

    def timed(fn) -> float:
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        return time.perf_counter() - t

    def copy_bytes() -> None:
        for w, p in pairs:
            w.copy_(p)

    ratios: dict[str, list[float]] = {"dense": [], "factors": []}
    for rep in range(23):
        engine.activate(None)
        c = timed(copy_bytes)
        for name, mode in (("A", "dense"), ("B", "factors")):
            engine.activate(None)
            s = timed(lambda n=name: engine.activate(n))
            if rep >= 3:
                ratios[mode].append(s / c)
    engine.activate(None)
    for mode, rs in ratios.items():
        out.append((f"swap {mode} / copy of the same bytes", True, f"median {statistics.median(rs):.2f} over {len(rs)}"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}")
    ok = True
    for name in args.dtypes.split(","):
        for what, passed, detail in check(getattr(torch, name), device):
            ok &= passed
            print(f"{'PASS' if passed else 'FAIL'} {name}: {what} {detail}".rstrip())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
