"""Question answering for `capaserve train`: SQuAD examples cut into the server's windows,
each window labelled with its answer's token span, and evaluation by the served decode.

Windows and decoding are not written again here: they are `adapters.tasks.qa`'s
(`QAWindows`, `best_span`), the code the server answers with, so the exact match and F1
reported after each epoch are those of the answers the bundle will be served with.

Labels follow transformers' `run_qa.py`: a window that holds the whole first answer is
labelled with the answer's first and last token; a window that does not (long contexts
are cut into several) points start and end at its first token (the CLS token), which
teaches the model that the answer is not there. Such windows are kept, not dropped, so
every part of a long context is seen in training. The served decode scores only context
tokens, so the first token itself is never answered.

Metrics are SQuAD v1.1's: answers are normalised (lower case, no punctuation, no articles
a/an/the, single spaces), exact match is 1 when the prediction equals any gold answer, F1
is the best token-overlap F1 against the gold answers; both averaged over examples.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapters.tasks.errors import InvalidRequest, UnsupportedTask
from adapters.tasks.qa import DEFAULT_MAX_ANSWER_LEN, QAInput, QAWindow, QAWindows, Span, best_span
from adapters.tasks.tokens import Tokens
from adapters.training.data import Dataset, TrainingDataError


@dataclass
class LabelledWindow:
    """One model row: a window of example `example`, with its answer's token span (or 0, 0)."""

    example: int
    window: QAWindow
    start: int
    end: int


def answer_tokens(window: QAWindow, start_char: int, end_char: int) -> tuple[int, int]:
    """Token positions of the first and last token of characters [start_char, end_char) in
    `window`, or (0, 0) when the window does not hold all of them (run_qa's rule)."""
    ctx = window.context_tokens
    offsets = window.offsets
    if not (offsets[ctx[0]][0] <= start_char and offsets[ctx[-1]][1] >= end_char):
        return 0, 0
    start = max(t for t in ctx if offsets[t][0] <= start_char)
    end = min(t for t in ctx if offsets[t][1] >= end_char)
    return start, max(start, end)


class QABatches:
    """A QA dataset as labelled windows; `batch` pads a list of window indices."""

    def __init__(self, ds: Dataset, tokenizer: Any, window_limit: int, device: torch.device) -> None:
        self.ds, self.tokenizer, self.device = ds, tokenizer, device
        cutter = QAWindows(Tokens(tokenizer, window_limit, model_id=str(ds.path)))
        self.window_len, self.stride = cutter.window, cutter.stride
        inputs = [QAInput(question=e.question, context=e.context) for e in ds.examples]  # type: ignore[arg-type]
        try:
            per_example = cutter.windows(inputs)
        except (InvalidRequest, UnsupportedTask) as exc:
            raise TrainingDataError(_name_line(str(exc), ds)) from None
        self.rows: list[LabelledWindow] = []
        for i, (ex, windows) in enumerate(zip(ds.examples, per_example)):
            text, start_char = ex.answers[0]  # type: ignore[index] - read_jsonl checked there is one
            for w in windows:
                s, e = answer_tokens(w, start_char, start_char + len(text))
                self.rows.append(LabelledWindow(example=i, window=w, start=s, end=e))

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: list[int]) -> dict[str, Any]:
        rows = [self.rows[i] for i in idx]
        enc = self.tokenizer.pad([r.window.features for r in rows], return_tensors="pt")
        return {
            "qa": {k: v.to(self.device) for k, v in enc.items()},
            "start": torch.tensor([r.start for r in rows], dtype=torch.long, device=self.device),
            "end": torch.tensor([r.end for r in rows], dtype=torch.long, device=self.device),
            "rows": idx,
        }


def _name_line(message: str, ds: Dataset) -> str:
    """`input 3: ...` from the window cutter, as `file:line: ...` of that example."""
    m = re.match(r"input (\d+): (.*)", message, re.S)
    if m is None:
        return f"{ds.path}: {message}"
    return f"{ds.path}:{ds.examples[int(m.group(1))].line}: {m.group(2)}"


def qa_loss(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Mean of the start and end cross-entropies over each window's real (unpadded) tokens."""
    pad = batch["qa"]["attention_mask"] == 0
    logits = logits.float().masked_fill(pad.unsqueeze(-1), torch.finfo(torch.float32).min)
    start = nn.functional.cross_entropy(logits[..., 0], batch["start"])
    end = nn.functional.cross_entropy(logits[..., 1], batch["end"])
    return (start + end) / 2


class AnswerPicker:
    """Best span per example over its windows, window by window as the server picks it:
    the highest score wins, the earlier window on a tie."""

    def __init__(self, data: QABatches, max_answer_len: int = DEFAULT_MAX_ANSWER_LEN) -> None:
        self.data, self.max_answer_len = data, max_answer_len
        self.best: dict[int, Span] = {}

    def add(self, logits: torch.Tensor, batch: dict[str, Any]) -> None:
        mask = batch["qa"]["attention_mask"]
        for lg, n, i in zip(logits.float().cpu(), mask.sum(-1).tolist(), batch["rows"]):
            row = self.data.rows[i]
            span = best_span(lg[:n, 0], lg[:n, 1], row.window, self.max_answer_len)
            held = self.best.get(row.example)
            if held is None or span.score > held.score:
                self.best[row.example] = span

    def answers(self) -> list[str]:
        """The predicted answer text of every example, in dataset order."""
        out = []
        for i, ex in enumerate(self.data.ds.examples):
            span = self.best[i]
            out.append(ex.context[span.start : span.end])  # type: ignore[index]
        return out


# --------------------------------------------------------------------------- SQuAD metrics


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, golds: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def f1_score(prediction: str, golds: list[str]) -> float:
    """Best token-overlap F1 of `prediction` against any gold answer."""

    def one(gold: str) -> float:
        p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
        common = sum((Counter(p) & Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(one(g) for g in golds)


def squad_scores(predictions: list[str], ds: Dataset) -> tuple[float, float]:
    """(exact match, F1), each averaged over the examples of `ds`, in [0, 1]."""
    golds = [[t for t, _ in ex.answers] for ex in ds.examples]  # type: ignore[union-attr]
    em = sum(exact_match(p, g) for p, g in zip(predictions, golds)) / len(golds)
    f1 = sum(f1_score(p, g) for p, g in zip(predictions, golds)) / len(golds)
    return em, f1
