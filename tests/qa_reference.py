"""An independent extractive-QA reference, written from docs/bundle-format.md#question-answering
alone: `AutoModelForQuestionAnswering` with every target weight replaced by W' by hand and the
bundle's head copied into `qa_outputs`, run one window at a time (no padding, no batching),
and decoded with plain loops over every (start, end) pair."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForQuestionAnswering

from adapters.bundle import AdapterBundle
from tests.engine_utils import hand_merge

#: The documented defaults: windows of min(384, model limit) tokens overlapping by 128.
WINDOW, STRIDE, MAX_ANSWER_LEN = 384, 128, 30


def qa_model(folder: Path, bundle: AdapterBundle) -> torch.nn.Module:
    """The transformers QA model of `folder` with W' written into its encoder and the head copied."""
    model = AutoModelForQuestionAnswering.from_pretrained(str(folder), local_files_only=True).eval()
    hand_merge(model.base_model, bundle)  # targets are named as AutoModel (the encoder) names them
    with torch.no_grad():
        model.qa_outputs.weight.copy_(bundle.head["head.qa.weight"])
        model.qa_outputs.bias.copy_(bundle.head["head.qa.bias"])
    return model


@dataclass
class Answer:
    answer: str
    score: float
    start: int
    end: int
    window: int  # the window the best span came from
    windows: list[tuple[int, int]]  # per window: the characters of the context it covers


def reference_answer(
    model: torch.nn.Module, tokenizer: Any, question: str, context: str,
    max_answer_len: int = MAX_ANSWER_LEN, window: int = WINDOW, stride: int = STRIDE,
) -> Answer:
    enc = tokenizer(
        question, context, truncation="only_second", max_length=window, stride=stride,
        return_overflowing_tokens=True, return_offsets_mapping=True,
    )
    best: tuple[float, int, int, int] | None = None
    covered: list[tuple[int, int]] = []
    for w in range(len(enc["input_ids"])):
        feats = {k: torch.tensor([enc[k][w]]) for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc}
        with torch.inference_mode():
            out = model(**feats)
        ctx = [t for t, s in enumerate(enc.sequence_ids(w)) if s == 1]  # the window's context tokens
        offsets = enc["offset_mapping"][w]
        covered.append((offsets[ctx[0]][0], offsets[ctx[-1]][1]))
        starts = [float(out.start_logits[0, t]) for t in ctx]
        ends = [float(out.end_logits[0, t]) for t in ctx]
        p_start, p_end = _softmax(starts), _softmax(ends)
        for a in range(len(ctx)):
            for b in range(a, min(a + max_answer_len, len(ctx))):  # s <= e < s + max_answer_len
                score = p_start[a] * p_end[b]
                if best is None or score > best[0]:
                    best = (score, offsets[ctx[a]][0], offsets[ctx[b]][1], w)
    assert best is not None
    score, start, end, w = best
    return Answer(context[start:end], score, start, end, w, covered)


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def crosses_windows(ans: Answer) -> bool:
    """The best span starts inside the previous window but ends beyond it: only the later
    window (through the overlap) holds all of it."""
    if ans.window == 0:
        return False
    lo, hi = ans.windows[ans.window - 1]
    return lo <= ans.start < hi < ans.end
