"""What the training tests share: one torch thread per test module, JSONL writing, and the
head-only baseline (a head trained on the frozen base's cached features with the same steps,
lr and batch size as the adapter run, scored on eval features)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: the box is shared, and oversubscribed threads make each step 5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def head_only_accuracy(
    head: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor], evaluation: tuple[torch.Tensor, torch.Tensor],
    *, steps: int, lr: float, batch: int,
) -> float:
    """Train `head` on (features, label ids) for `steps` AdamW steps; its eval accuracy."""
    (xt, yt), (xe, ye) = train, evaluation
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    g, step = torch.Generator().manual_seed(0), 0
    while step < steps:
        for idx in torch.randperm(len(yt), generator=g).split(batch):
            loss = torch.nn.functional.cross_entropy(head(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    with torch.no_grad():
        return float((head(xe).argmax(-1) == ye).float().mean())
