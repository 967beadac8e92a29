"""loadtest/bench_merge.py keeps working and its figures mean something: its --quick run
prints and writes one table whose numbers are finite, positive, within sane bands, equal
to medians recomputed from the raw samples, and backed by the swaps the engines counted."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

REPS = 3
MODELS = ("all-MiniLM-L6-v2", "random Llama h=128 L=2", "random ViT h=64 L=2 32px")  # the --quick sizes
RATIO_ROWS = {  # table row -> (numerator, denominator) samples, digits printed
    "**merged / base**": ("merged", "base", 3),
    "CapaBoost unmerged / merged": ("capaboost_unmerged", "merged", 3),
    "PEFT unmerged / merged": ("peft_unmerged", "merged", 3),
    "**swap dense / copy**": ("swap_dense", "copy", 2),
    "**swap factors / copy**": ("swap_factors", "copy", 2),
}
MS_ROWS = {  # table row -> Result.times key
    "base forward, ms": "base",
    "merged forward, ms": "merged",
    "CapaBoost unmerged forward, ms": "capaboost_unmerged",
    "PEFT LoRA r=d*r unmerged, ms": "peft_unmerged",
    "copy target bytes, ms": "copy",
    "swap dense, ms": "swap_dense",
    "swap factors, ms": "swap_factors",
}


def parse_table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """(model columns, row name -> cells) of the Markdown table in `text`."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "metric" and header[-1] == "goal", header
    assert set(lines[1].replace("|", "")) == {"-"}, lines[1]
    rows: dict[str, list[str]] = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        assert len(cells) == len(header), ln
        assert cells[0] not in rows, f"duplicate row {cells[0]!r}"
        rows[cells[0]] = cells[1:-1]
    return header[1:-1], rows


def bert_params(config: dict[str, Any]) -> int:
    """Parameters of a BertModel with its pooler, from its config alone."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    emb = (config["vocab_size"] + config["max_position_embeddings"] + config["type_vocab_size"]) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    return emb + n * layer + (h * h + h)


def llama_params(vocab: int, h: int, layers: int) -> int:
    """Parameters of bench_merge's random Llama (one head of h, untied lm_head, no biases)."""
    inter = int(h * 2.75)
    return 2 * vocab * h + layers * (4 * h * h + 3 * h * inter + 2 * h) + h


def vit_params(h: int, layers: int, image: int, patch: int) -> int:
    """Parameters of bench_merge's random ViTModel (4h MLP, with its pooler), from its sizes alone."""
    tokens = (image // patch) ** 2 + 1
    embed = 3 * patch * patch * h + h + h + tokens * h  # patch projection, class token, positions
    layer = 4 * (h * h + h) + 2 * 2 * h + (h * 4 * h + 4 * h) + (4 * h * h + h)
    return embed + layers * layer + 2 * h + (h * h + h)


def test_bench_merge_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                           minilm_dir: Path) -> None:
    """The printed and written table equals the medians of the paired per-repetition ratios
    recomputed here from each variant's raw samples; every figure is finite and positive;
    merged costs about what base does (0.5-2x); the swap/copy ratios rule out a swap that
    writes nothing; and each engine counted exactly 6 swaps and 3 cache hits per repetition
    (2 warm-up), 2 loads (one dense, one factors) holding the bytes computed from the
    bundle's shapes."""
    from loadtest import bench_merge

    captured: list[tuple[Any, Any, Any]] = []  # (engine, bundle, Result) per model
    original = bench_merge.bench_engine

    def recording(label: str, engine: Any, bundle: Any, batch: Any, reps: int) -> Any:
        res = original(label, engine, bundle, batch, reps)
        captured.append((engine, bundle, res))
        return res

    monkeypatch.setattr(bench_merge, "bench_engine", recording)
    threads = torch.get_num_threads()
    out = tmp_path / "bench.md"
    try:
        assert bench_merge.main(["--quick", "--reps", str(REPS), "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert capsys.readouterr().out.strip() == text.strip()  # printed == written
    assert f"CPU, 1 threads, float32, {REPS} interleaved repetitions, medians" in text.splitlines()[0]
    models, rows = parse_table(text)
    assert tuple(models) == MODELS
    assert [r.model for _, _, r in captured] == list(MODELS)

    bert = bert_params(json.loads((minilm_dir / "config.json").read_text()))
    assert rows["parameters (M)"] == [
        f"{bert / 1e6:.1f}", f"{llama_params(4096, 128, 2) / 1e6:.1f}", f"{vit_params(64, 2, 32, 8) / 1e6:.1f}"
    ]
    assert sum(p.numel() for p in captured[2][0].model.parameters()) == vit_params(64, 2, 32, 8)
    # quick: 16 tokens, one sequence; one 32 px image in 8 px patches is 16 patches and a class token
    assert rows["tokens per forward"] == ["16", "16", "17"]
    # MiniLM: 6 layers x (query, key, value, attention.output.dense); Llama and ViT: 2 x (q, k, v, o)_proj
    assert rows["targets (rank)"] == ["24 (r=8, d=2)", "8 (r=8, d=2)", "8 (r=8, d=2)"]

    for col, (engine, bundle, res) in enumerate(captured):
        for key, samples in res.times.items():
            assert len(samples) == REPS and all(math.isfinite(s) and s > 0 for s in samples), (key, samples)
        for row, key in MS_ROWS.items():
            assert rows[row][col] == f"{statistics.median(res.times[key]) * 1e3:.2f}", row
        for row, (num, den, digits) in RATIO_ROWS.items():
            paired = [a / b for a, b in zip(res.times[num], res.times[den], strict=True)]
            assert rows[row][col] == f"{statistics.median(paired):.{digits}f}", row
            value = float(rows[row][col])
            assert math.isfinite(value) and value > 0, (row, value)
        minima = min(res.times["merged"]) / min(res.times["base"])
        assert rows["merged / base, ratio of minima"][col] == f"{minima:.3f}"
        assert 0.5 <= float(rows["**merged / base**"][col]) <= 2.0, res.model
        assert 0.5 <= minima <= 2.0, res.model
        for row in ("CapaBoost unmerged / merged", "PEFT unmerged / merged"):
            assert 0.5 <= float(rows[row][col]) <= 20.0, (res.model, row)
        # a swap reads pristine + delta and writes the weight: no cheaper than a fifth of a copy
        for row in ("**swap dense / copy**", "**swap factors / copy**"):
            assert 0.2 <= float(rows[row][col]) <= 200.0, (res.model, row)

        # per repetition: merged variant (base -> dense -> base) and the two timed swaps each
        # followed by a restore: 2 + 2 + 2 swaps; hits: activate("dense") twice, "factors" once
        stats = engine.stats()
        rounds = REPS + 2
        assert (stats.swaps, stats.cache_hits, stats.cache_misses, stats.cache_evictions) == (6 * rounds, 3 * rounds, 2, 0)
        assert stats.active_adapter is None and stats.loaded_adapters == 2
        meta = bundle.metadata
        dense = sum(f.out_features * f.in_features * 4 for f in bundle.targets.values())
        factors = sum((f.out_features + f.in_features) * meta.rank * meta.num_copies * 4 for f in bundle.targets.values())
        head = sum(t.numel() * 4 for t in bundle.head.values())
        # held compact: the factors in the bundle's dtype (float32 here), the masks as bits, the head
        compact = head + sum(
            (f.lora_A.numel() + f.lora_B.numel()) * 4 + -(-f.mask_A.numel() // 8) + -(-f.mask_B.numel() // 8)
            for f in bundle.targets.values()
        )
        held = {a.name: (a.mode, a.nbytes) for a in engine.list_adapters()}
        # built forms: the factor adapter keeps its float32 pairs; the dense one's (ΔW and pairs)
        # is not kept after its swaps, since the bench leaves the dense budget at 0
        assert dense > factors
        assert held == {"dense": ("dense", compact), "factors": ("factors", compact + factors)}
        assert stats.cache_bytes == 2 * compact + factors
