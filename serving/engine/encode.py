"""Encoder requests: one pass over rows that may mix embeddings, classification and
question answering.

Every encoder task shares each forward (same adapter, or mixed), so the scheduler can
batch the endpoints together and endpoints never split a batch. An input becomes one
model row (a text, or an image on an image base) or, for question answering, one row per
window of its context (adapters.tasks.qa); rows are run in chunks and each input's
answer is assembled from its own rows only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from adapters.bundle import Task
from adapters.tasks.errors import InvalidRequest, UnsupportedTask
from adapters.tasks.kinds import ENCODER_KINDS, RequestKind
from adapters.tasks.pixels import ImageInputs, check_images
from adapters.tasks.qa import QAInput, QAWindow, QAWindows, Span, best_span
from adapters.tasks.tokens import Tokens
from serving.engine.adapter_cache import PreparedAdapter
from serving.engine.mixed import adapter_order
from serving.engine.outputs import EncodedRow
from serving.engine.pooling import classification_head, l2_normalize, mean_pool, pool
from serving.engine.residency import AdapterResidency, Entry
from serving.engine.unpadded import forward_unpadded, unpadded_applies

#: Model rows per encoder forward; the lock is released between chunks.
ENCODE_CHUNK = 64

#: merged: the batch's one adapter is written into the weights; mixed: base weights, per-row updates.
AdapterMode = Literal["merged", "mixed"]

#: One input: a text, a question-answering pair, or (image base) an image's PNG/JPEG bytes.
EncodeInput = str | QAInput | bytes


@dataclass
class _Row:
    """One model row: input `item`'s text, image, or its `window_no`-th question-answering window."""

    item: int
    length: int
    tokens: dict[str, list[int]] | None = None  # text rows and QA windows
    window: QAWindow | None = None
    window_no: int = 0


class EncodeRunner:
    """Runs `encode` calls on an encoder base model (text, or images with `images`)."""

    def __init__(
        self, model: torch.nn.Module, task: Task, tokens: Tokens, residency: AdapterResidency,
        images: ImageInputs | None = None,
    ) -> None:
        self.model = model
        self.task = task
        self.tokens = tokens
        self.residency = residency
        self.images = images
        self.qa = QAWindows(tokens) if images is None and tokens.tokenizer is not None else None
        #: text forwards skip padding outside attention (serving/engine/unpadded.py)
        self.unpadded = images is None and unpadded_applies(model)
        #: How the last forward ran; tests read it to tell the two paths apart.
        self.mode: AdapterMode = "merged"

    def encode(
        self, inputs: Sequence[EncodeInput], adapters: list[str | None], tasks: list[RequestKind], *, mixed: bool = False
    ) -> list[EncodedRow]:
        """Row i uses adapters[i] (None: the base) and gets tasks[i]: a mean-pooled,
        L2-normalised embedding, the softmax of its classification head, or (a QAInput)
        its answer span. Merged (the default) needs one adapter for all rows, written into
        the weights; mixed=True runs the rows unmerged on the pristine base, each with its own."""
        if self.task is Task.CAUSAL_LM:
            what = "classification" if isinstance(tasks, list) and RequestKind.EMBED not in tasks else "embeddings"
            raise UnsupportedTask(f"{what} needs an encoder base model; {self.tokens.model_id!r} is a causal LM")
        if not isinstance(inputs, list) or not inputs:
            raise InvalidRequest("input must be a non-empty list")
        if not isinstance(adapters, list) or len(adapters) != len(inputs):
            raise InvalidRequest("adapters must be a list with one entry (a name or None) per input")
        if not isinstance(tasks, list) or len(tasks) != len(inputs) or any(t not in ENCODER_KINDS for t in tasks):
            raise InvalidRequest("tasks must be a list with one entry (embed, classify or qa) per input")
        if not mixed and len(set(adapters)) > 1:
            raise InvalidRequest("a merged encoder batch holds one adapter; pass mixed=True for several")
        self._check_adapters(adapters, tasks)
        rows = self._rows(inputs, tasks)
        done: list[EncodedRow | None] = [None] * len(inputs)
        spans: dict[int, tuple[Span, int]] = {}  # QA input -> (best span so far, its window number)
        with self.residency.lease(adapters) as entries:
            for hidden, mask, chunk in self._hidden_states(inputs, rows, entries, mixed):
                chunk_rows = [rows[r] for r in chunk]
                for row, out in zip(chunk_rows, self._rows_out(hidden, mask, chunk_rows, entries, tasks, inputs)):
                    if isinstance(out, Span):
                        best = spans.get(row.item)
                        if best is None or (out.score, -row.window_no) > (best[0].score, -best[1]):
                            spans[row.item] = (out, row.window_no)
                    else:
                        done[row.item] = out
        for i, (span, _) in spans.items():
            context = inputs[i].context  # type: ignore[union-attr] - a QA row's input is a QAInput
            tokens = sum(r.length for r in rows if r.item == i)
            done[i] = EncodedRow(
                task=RequestKind.QA, prompt_tokens=tokens, answer=context[span.start:span.end], score=span.score,
                start=span.start, end=span.end,
            )
        return done  # type: ignore[return-value] - every input was filled

    def _check_adapters(self, names: list[str | None], tasks: list[RequestKind]) -> None:
        """classify rows need a loaded classifier of this base's kind, qa rows a question-answering
        adapter (checked before any tokenizing or decoding)."""
        image = self.images is not None
        need = {
            RequestKind.CLASSIFY: Task.IMAGE_CLASSIFICATION if image else Task.SEQUENCE_CLASSIFICATION,
            RequestKind.QA: Task.QUESTION_ANSWERING,
        }
        what = {RequestKind.CLASSIFY: "classification", RequestKind.QA: "question answering"}
        if image and RequestKind.QA in tasks:
            raise UnsupportedTask(f"question answering needs a text base model; {self.tokens.model_id!r} is an image model")
        for kind, task in need.items():
            for name in dict.fromkeys(n for n, t in zip(names, tasks) if t == kind):
                if name is None:
                    article = "an" if task.value[0] in "aeiou" else "a"
                    raise UnsupportedTask(f"{what[kind]} needs {article} {task.value} adapter, not the base model")
                have = self.residency.task_of(name)
                if have is not task:
                    raise UnsupportedTask(f"adapter {name!r} is a {have.value} adapter, not {task.value}")

    def _rows(self, inputs: Sequence[EncodeInput], tasks: list[RequestKind]) -> list[_Row]:
        """Model rows in input order, every input checked (lengths, windows, image bytes)."""
        if self.images is not None:
            check_images(list(inputs), self.tokens.model_id)
            return [_Row(item=i, length=self.images.tokens) for i in range(len(inputs))]
        texts = [i for i, t in enumerate(tasks) if t != RequestKind.QA]
        pairs = [i for i, t in enumerate(tasks) if t == RequestKind.QA]
        per_item: dict[int, list[_Row]] = {}
        if texts:
            if any(isinstance(inputs[i], (bytes, bytearray)) for i in texts):
                raise InvalidRequest(f"{self.tokens.model_id!r} is a text model; inputs must be strings, not images")
            enc = self.tokens.texts([inputs[i] for i in texts])  # type: ignore[misc] - checked there
            keys = list(enc.keys())
            for k, i in enumerate(texts):
                ids = enc["input_ids"][k]
                per_item[i] = [_Row(item=i, length=len(ids), tokens={key: enc[key][k] for key in keys})]
        if pairs:
            if self.qa is None:
                raise UnsupportedTask(f"question answering needs a tokenizer; {self.tokens.model_id!r} has none")
            if not all(isinstance(inputs[i], QAInput) for i in pairs):
                raise InvalidRequest("question-answering inputs must be {question, context} pairs")
            for i, windows in zip(pairs, self.qa.windows([inputs[i] for i in pairs])):  # type: ignore[misc]
                per_item[i] = [
                    _Row(item=i, length=len(w.features["input_ids"]), tokens=w.features, window=w, window_no=n)
                    for n, w in enumerate(windows)
                ]
        return [row for i in range(len(inputs)) for row in per_item[i]]

    def _hidden_states(
        self, inputs: Sequence[EncodeInput], rows: list[_Row], entries: list[Entry], mixed: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        """Per chunk: last hidden states, masks and the rows they hold, each forward under the lock.

        Mixed: a chunk's rows go in adapter order, so each adapter's rows are one slice of
        the batch (same padding) and its update is one pair of matmuls on a view.
        """
        device = self.residency.device
        for lo in range(0, len(rows), ENCODE_CHUNK):
            chunk = list(range(lo, min(len(rows), lo + ENCODE_CHUNK)))
            if mixed:
                chunk = [chunk[k] for k in adapter_order([id(entries[rows[r].item]) for r in chunk])]
            if self.images is not None:
                batch = {"pixel_values": self.images.pixels([inputs[rows[r].item] for r in chunk])}  # type: ignore[misc]
            else:
                batch = {k: v.to(device) for k, v in self.tokens.pad([rows[r].tokens for r in chunk]).items()}  # type: ignore[misc]
            row_entries = [entries[rows[r].item] for r in chunk]
            if mixed and self.unpadded:
                # the update hooks see the real tokens stacked row by row, so each token is a
                # "row" of its text's adapter (still one slice per adapter: rows go in adapter order)
                lengths = batch["attention_mask"].sum(1).tolist()
                row_entries = [e for e, n in zip(row_entries, lengths) for _ in range(n)]
            weights = self.residency.unmerged(row_entries) if mixed else self.residency.merged(entries[0])
            with weights, torch.inference_mode():
                self.mode = "mixed" if mixed else "merged"
                if self.unpadded:
                    hidden = forward_unpadded(self.model, batch)  # type: ignore[arg-type] - a BertModel
                else:
                    hidden = self.model(**batch).last_hidden_state
            mask = batch.get("attention_mask")
            if mask is None:  # images: every position is real
                mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            yield hidden, mask, chunk

    def _rows_out(
        self, hidden: torch.Tensor, mask: torch.Tensor, rows: list[_Row], entries: list[Entry],
        tasks: list[RequestKind], inputs: Sequence[EncodeInput],
    ) -> list[EncodedRow | Span]:
        """One chunk's results: embed rows pooled together, classify and qa rows per adapter
        (each with its own head); a qa row gives its window's best span."""
        out: list[EncodedRow | Span | None] = [None] * len(rows)
        groups: dict[Any, list[int]] = {}
        for k, row in enumerate(rows):
            task = tasks[row.item]
            groups.setdefault(RequestKind.EMBED if task == RequestKind.EMBED else (task, id(entries[row.item])), []).append(k)
        left = getattr(self.tokens.tokenizer, "padding_side", "right") == "left"
        for key, ks in groups.items():
            if len(ks) == len(rows):
                h, m = hidden, mask
            else:
                idx = torch.tensor(ks, device=hidden.device)
                h, m = hidden.index_select(0, idx), mask.index_select(0, idx)
            if key == RequestKind.EMBED:
                for k, v in zip(ks, l2_normalize(mean_pool(h, m)).cpu()):
                    out[k] = EncodedRow(task=RequestKind.EMBED, prompt_tokens=rows[k].length, embedding=v)
                continue
            e = entries[rows[ks[0]].item]
            assert e is not None
            if key[0] == RequestKind.CLASSIFY:
                for k, row in zip(ks, _classified(h, m, e, [rows[k].length for k in ks])):
                    out[k] = row
                continue
            logits = torch.nn.functional.linear(h.to(torch.float32), e.head["head.qa.weight"], e.head["head.qa.bias"]).cpu()
            for k, lg in zip(ks, logits):
                row = rows[k]
                lg = lg[lg.shape[0] - row.length:] if left else lg  # positions as the tokenizer counted them
                assert row.window is not None
                item = inputs[row.item]
                assert isinstance(item, QAInput)
                out[k] = best_span(lg[:, 0], lg[:, 1], row.window, item.max_answer_len)
        return out  # type: ignore[return-value] - every row was filled


def _classified(h: torch.Tensor, m: torch.Tensor, e: PreparedAdapter, lengths: list[int]) -> list[EncodedRow]:
    """Rows of one classifier adapter: its pooling, head and labels."""
    names = list(e.metadata.labels or [])
    probs = torch.softmax(classification_head(pool(h, m, e.metadata.pooling or "mean"), e.head), dim=-1).cpu()
    return [
        EncodedRow(task=RequestKind.CLASSIFY, prompt_tokens=n, label=names[int(p.argmax())], probs=p, label_names=names)
        for n, p in zip(lengths, probs)
    ]
