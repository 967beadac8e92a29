"""Extractive question answering (docs/bundle-format.md#question-answering): the windows a
(question, context) pair is cut into, and the best answer span of each window.

The rule is the one transformers 4.x's `pipeline("question-answering", align_to_words=False)`
followed (transformers 5 dropped that pipeline): the pair is tokenized question first,
truncating only the context, in windows of `window_len` tokens (min(384, the model's
limit)) that overlap by `doc_stride` = min(128, window_len // 2) tokens (128 whenever
windows hold 256 tokens or more, as they do by default). In each window the start and end
logits are softmaxed over the window's context tokens only; a span (s, e) needs
s <= e < s + max_answer_len and scores p_start[s] * p_end[e]. The answer is the best span
over all windows (the first window wins a tie), with character offsets from the fast
tokenizer's offset mapping. Each input is decoded from its own windows only, so the rows
of a batch stay independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from adapters.tasks.errors import InvalidRequest, UnsupportedTask
from adapters.tasks.tokens import Tokens

#: Window length cap and overlap of docs/bundle-format.md#question-answering.
MAX_WINDOW = 384
DOC_STRIDE = 128
DEFAULT_MAX_ANSWER_LEN = 30
#: Most windows one input may take (about 16k context tokens with the default windows);
#: a longer context answers 400 instead of holding the replica for seconds.
MAX_WINDOWS = 64


class QAInput(BaseModel):
    """One question about one context; `max_answer_len` bounds the answer in tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    question: str = Field(..., description="The question.")
    context: str = Field(..., description="The text the answer is taken from.")
    max_answer_len: int = Field(DEFAULT_MAX_ANSWER_LEN, ge=1, description="Longest answer, in tokens.")


@dataclass
class QAWindow:
    """One window of one input: the model row's features and how to read its logits."""

    features: dict[str, list[int]]  # input_ids, attention_mask (and token_type_ids) of the row
    context_tokens: list[int]  # positions of the window's context tokens
    offsets: list[tuple[int, int]]  # per position: (start, end) characters in the context


@dataclass(frozen=True)
class Span:
    """A window's best span: its score and character offsets in the context."""

    score: float
    start: int
    end: int


def window_shape(max_len: int) -> tuple[int, int]:
    """(window length, doc_stride) for a model whose inputs are limited to `max_len` tokens."""
    window = min(MAX_WINDOW, max_len)
    return window, min(DOC_STRIDE, window // 2)


class QAWindows:
    """Cuts (question, context) pairs into model rows, with the model's tokenizer (under its lock)."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens
        self.tokenizer: Any = tokens.tokenizer
        self.window, self.stride = window_shape(tokens.max_len)

    def windows(self, items: list[QAInput]) -> list[list[QAWindow]]:
        """Each input's windows, in order; InvalidRequest names the first input that cannot be cut."""
        if self.tokenizer is None or not getattr(self.tokenizer, "is_fast", False):
            raise UnsupportedTask("question answering needs a fast tokenizer (its character offsets give the answer)")
        with self.tokens.lock:
            alone = self.tokenizer(
                [it.question for it in items] + [it.context for it in items], add_special_tokens=False, verbose=False
            )["input_ids"]
            for i, item in enumerate(items):
                self._check(i, item, len(alone[i]), len(alone[len(items) + i]))
            enc = self.tokenizer(
                [it.question for it in items],
                [it.context for it in items],
                truncation="only_second",
                max_length=self.window,
                stride=self.stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )
        out: list[list[QAWindow]] = [[] for _ in items]
        keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
        for k, item in enumerate(enc["overflow_to_sample_mapping"]):
            seq = enc.sequence_ids(k)
            out[item].append(
                QAWindow(
                    features={key: enc[key][k] for key in keys},
                    context_tokens=[t for t, s in enumerate(seq) if s == 1],
                    offsets=[tuple(o) for o in enc["offset_mapping"][k]],
                )
            )
        return out

    def _check(self, i: int, item: QAInput, q: int, c: int) -> None:
        """What the tokenizer would fail on (or panic on: a stride it cannot keep), as a 400;
        `q` and `c` are the question's and the context's token counts."""
        if not item.question.strip():
            raise InvalidRequest(f"input {i}: question is empty")
        if c == 0:
            raise InvalidRequest(f"input {i}: context is empty")
        room = self.window - q - self.tokenizer.num_special_tokens_to_add(pair=True)
        if c <= room:
            return
        if room <= self.stride:
            raise InvalidRequest(
                f"input {i}: the question has {q} tokens, which leaves {max(room, 0)} context tokens per "
                f"{self.window}-token window; long contexts need more than the {self.stride}-token overlap"
            )
        n = 1 + math.ceil((c - room) / (room - self.stride))
        if n > MAX_WINDOWS:
            raise InvalidRequest(
                f"input {i}: the context has {c} tokens and would take {n} windows of {self.window} tokens; "
                f"the limit is {MAX_WINDOWS}"
            )


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, window: QAWindow, max_answer_len: int) -> Span:
    """The best (s, e) of one window from its [L] start and end logits (float32)."""
    ctx = torch.tensor(window.context_tokens, dtype=torch.long, device=start_logits.device)
    p_start = torch.softmax(start_logits.index_select(0, ctx), dim=-1)
    p_end = torch.softmax(end_logits.index_select(0, ctx), dim=-1)
    scores = p_start[:, None] * p_end[None, :]  # [s, e] over context positions
    n = scores.shape[0]
    gap = torch.arange(n, device=scores.device)[None, :] - torch.arange(n, device=scores.device)[:, None]
    # context tokens are contiguous, so a gap in positions is a gap in tokens
    scores = scores.masked_fill((gap < 0) | (gap >= max_answer_len), -1.0)
    best = int(torch.argmax(scores))  # the first maximum in (s, e) order
    s, e = divmod(best, n)
    return Span(
        score=float(scores[s, e]),
        start=window.offsets[window.context_tokens[s]][0],
        end=window.offsets[window.context_tokens[e]][1],
    )
