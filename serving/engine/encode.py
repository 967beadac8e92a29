"""Encoder requests: one pass over rows that may mix embeddings and classification.

Embedding and classification rows share each forward (same adapter, or mixed), so the
scheduler can batch the two endpoints together and endpoints never split a batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch

from adapters.bundle import Task
from serving.engine.adapter_cache import PreparedAdapter
from serving.engine.mixed import adapter_order
from serving.engine.outputs import EncodedRow, EncodeTask
from serving.engine.pooling import classification_head, l2_normalize, mean_pool, pool
from serving.engine.residency import AdapterResidency, Entry
from serving.engine.tokens import Tokens
from serving.errors import InvalidRequest, UnsupportedTask

#: Texts per encoder forward; the lock is released between chunks.
ENCODE_CHUNK = 64

#: merged: the batch's one adapter is written into the weights; mixed: base weights, per-row updates.
AdapterMode = Literal["merged", "mixed"]


class EncodeRunner:
    """Runs `encode` calls: embeddings and classification on an encoder base model."""

    def __init__(self, model: torch.nn.Module, task: Task, tokens: Tokens, residency: AdapterResidency) -> None:
        self.model = model
        self.task = task
        self.tokens = tokens
        self.residency = residency
        #: How the last forward ran; tests read it to tell the two paths apart.
        self.mode: AdapterMode = "merged"

    def encode(
        self, texts: list[str], adapters: list[str | None], tasks: list[EncodeTask], *, mixed: bool = False
    ) -> list[EncodedRow]:
        """Row i uses adapters[i] (None: the base) and gets tasks[i]: a mean-pooled,
        L2-normalised embedding, or the softmax of its adapter's head. Merged (the default)
        needs one adapter for all rows, written into the weights; mixed=True runs the rows
        unmerged on the pristine base, each with its own adapter."""
        if self.task is Task.CAUSAL_LM:
            what = "classification" if isinstance(tasks, list) and "embed" not in tasks else "embeddings"
            raise UnsupportedTask(f"{what} needs an encoder base model; {self.tokens.model_id!r} is a causal LM")
        if not isinstance(texts, list) or not texts:
            raise InvalidRequest("input must be a non-empty list of strings")
        if not isinstance(adapters, list) or len(adapters) != len(texts):
            raise InvalidRequest("adapters must be a list with one entry (a name or None) per text")
        if not isinstance(tasks, list) or len(tasks) != len(texts) or any(t not in ("embed", "classify") for t in tasks):
            raise InvalidRequest("tasks must be a list with one entry (embed or classify) per text")
        if not mixed and len(set(adapters)) > 1:
            raise InvalidRequest("a merged encoder batch holds one adapter; pass mixed=True for several")
        self._check_classifiers([a for a, t in zip(adapters, tasks) if t == "classify"])
        enc = self.tokens.texts(texts)
        ids = enc["input_ids"]
        out: list[EncodedRow | None] = [None] * len(texts)
        with self.residency.lease(adapters) as entries:
            for hidden, mask, rows in self._hidden_states(enc, entries, mixed):
                pooled = _rows_out(hidden, mask, [entries[i] for i in rows], [tasks[i] for i in rows],
                                   [ids[i] for i in rows])
                for i, row in zip(rows, pooled):
                    out[i] = row
        return out  # type: ignore[return-value] - every row was filled

    def _check_classifiers(self, names: list[str | None]) -> None:
        """Every classify row needs a loaded sequence-classification adapter (checked before tokenizing)."""
        for name in dict.fromkeys(names):
            if name is None:
                raise UnsupportedTask("classification needs a sequence-classification adapter, not the base model")
            task = self.residency.task_of(name)
            if task is not Task.SEQUENCE_CLASSIFICATION:
                raise UnsupportedTask(f"adapter {name!r} is a {task.value} adapter, not sequence-classification")

    def _hidden_states(
        self, enc: Any, entries: list[Entry], mixed: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        """Per chunk: last hidden states, masks and the input rows they hold, each forward under the lock.

        Mixed: a chunk's rows go in adapter order, so each adapter's rows are one slice of
        the batch (same padding) and its update is one pair of matmuls on a view.
        """
        n = len(enc["input_ids"])
        device = self.residency.device
        for lo in range(0, n, ENCODE_CHUNK):
            rows = list(range(lo, min(n, lo + ENCODE_CHUNK)))
            if mixed:
                rows = [rows[k] for k in adapter_order([id(entries[i]) for i in rows])]
            batch = {k: v.to(device) for k, v in self.tokens.pad(enc, rows).items()}
            weights = self.residency.unmerged([entries[i] for i in rows]) if mixed else self.residency.merged(entries[0])
            with weights, torch.inference_mode():
                self.mode = "mixed" if mixed else "merged"
                hidden = self.model(**batch).last_hidden_state
            yield hidden, batch["attention_mask"], rows


def _rows_out(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    entries: list[PreparedAdapter | None],
    tasks: list[EncodeTask],
    ids: list[list[int]],
) -> list[EncodedRow]:
    """Pool one chunk: embed rows together, classify rows per adapter (its pooling and head)."""
    rows: list[EncodedRow | None] = [None] * len(tasks)
    groups: dict[Any, list[int]] = {}
    for k, (task, e) in enumerate(zip(tasks, entries)):
        groups.setdefault("embed" if task == "embed" else id(e), []).append(k)
    for key, ks in groups.items():
        if len(ks) == len(tasks):
            h, m = hidden, mask
        else:
            idx = torch.tensor(ks, device=hidden.device)
            h, m = hidden.index_select(0, idx), mask.index_select(0, idx)
        if key == "embed":
            for k, v in zip(ks, l2_normalize(mean_pool(h, m)).cpu()):
                rows[k] = EncodedRow(task="embed", prompt_tokens=len(ids[k]), embedding=v)
            continue
        e = entries[ks[0]]
        assert e is not None
        names = list(e.metadata.labels or [])
        probs = torch.softmax(classification_head(pool(h, m, e.metadata.pooling or "mean"), e.head), dim=-1).cpu()
        for k, p in zip(ks, probs):
            rows[k] = EncodedRow(
                task="classify", prompt_tokens=len(ids[k]), label=names[int(p.argmax())], probs=p, label_names=names
            )
    return [r for r in rows if r is not None]
