"""loadtest/bench_bundle_bytes.py measures what it says: its sizes are the files' sizes, the
seed bundle is within 1% of PEFT's own LoRA file, and packed costs exactly the mask bits."""

from __future__ import annotations

from pathlib import Path

from loadtest.bench_bundle_bytes import COPIES, DTYPES, RANK, measure, minilm, table

LAYERS, HIDDEN = 6, 384  # all-MiniLM-L6-v2: query and value are [384, 384]


def test_sizes_and_ratios(tmp_path: Path) -> None:
    rows = measure(minilm(random_weights=False), tmp_path)
    assert [(r["dtype"], r["d"]) for r in rows] == [(t, d) for t in DTYPES for d in COPIES]
    for r in rows:
        peft, seed, packed, dense = (int(r[k]) for k in ("peft", "seed", "packed", "dense"))
        factor_bytes = 2 * LAYERS * RANK * 2 * HIDDEN * (2 if r["dtype"] == "float16" else 4)
        assert factor_bytes < peft < factor_bytes * 1.03 and factor_bytes < seed <= 1.01 * peft
        bits = 2 * LAYERS * int(r["d"]) * RANK * 2 * HIDDEN  # every mask element of the 24 masks
        assert packed - seed > bits // 8 and dense - seed > bits  # the masks plus their header entries
        assert packed - seed < bits // 8 + 4096 and dense - seed < bits + 4096
    assert "| float16 | 2 |" in table(rows)
