"""loadtest/bench_merge.py keeps working: its --quick run prints and writes the full table."""

from __future__ import annotations

from pathlib import Path

import torch


def test_bench_merge_quick(tmp_path: Path) -> None:
    from loadtest.bench_merge import main

    threads = torch.get_num_threads()
    out = tmp_path / "bench.md"
    try:
        assert main(["--quick", "--reps", "1", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    for row in ("**merged / base**", "CapaBoost unmerged / merged", "PEFT unmerged / merged", "**swap dense / copy**",
                "**swap factors / copy**"):
        assert row in text
    assert "all-MiniLM-L6-v2" in text and "random Llama" in text
