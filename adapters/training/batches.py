"""Model inputs for one dataset: `make_batches` binds a parsed dataset to what its task
needs (tokenizer or image processor, label ids) and gives `len()` trainable items and
`batch(indices)`, a dict of tensors on the device. The loop knows nothing of tasks' inputs.

Items are examples, except for question answering, where they are windows
(`adapters.training.qa.QABatches`): one long context gives several.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from adapters.bundle import Task
from adapters.tasks.errors import InvalidRequest
from adapters.tasks.images import decode_image
from adapters.training.data import Dataset, TrainingDataError
from adapters.training.qa import QABatches

#: Tokens per text when --max-length is not given (every text task but question answering).
DEFAULT_MAX_LENGTH = 128


class Batches(Protocol):
    def __len__(self) -> int: ...

    def batch(self, idx: list[int]) -> dict[str, Any]: ...


class TextBatches:
    """Padded token tensors for the text tasks (and the label ids of classification)."""

    def __init__(
        self, ds: Dataset, tokenizer: Any, max_length: int, device: torch.device, targets: list[int] | None
    ) -> None:
        self.ds, self.tok, self.max_length, self.device, self.targets = ds, tokenizer, max_length, device, targets
        if ds.task is Task.CAUSAL_LM:
            self.eos = tokenizer.eos_token_id
            pad = tokenizer.pad_token_id
            self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)

    def __len__(self) -> int:
        return len(self.ds)

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def _encode_lm(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Each text then EOS (so the model learns to stop), right-padded; loss on real tokens only."""
        rows: list[list[int]] = []
        for t in texts:
            ids = list(self.tok(t, truncation=True, max_length=self.max_length)["input_ids"])
            if self.eos is not None and (not ids or ids[-1] != self.eos):
                ids = ids[: self.max_length - 1] + [self.eos]
            rows.append(ids)
        n = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "labels": labels.to(self.device),
        }

    def batch(self, idx: list[int]) -> dict[str, Any]:
        ex = [self.ds.examples[i] for i in idx]
        if self.ds.task is Task.CAUSAL_LM:
            return {"lm": self._encode_lm([e.text for e in ex])}  # type: ignore[misc]
        if self.ds.task is Task.FEATURE_EXTRACTION:
            return {
                "anchor": self._encode([e.anchor for e in ex]),  # type: ignore[misc]
                "positive": self._encode([e.positive for e in ex]),  # type: ignore[misc]
            }
        assert self.targets is not None
        return {
            "text": self._encode([e.text for e in ex]),  # type: ignore[misc]
            "labels": torch.tensor([self.targets[i] for i in idx], dtype=torch.long, device=self.device),
        }


class ImageBatches:
    """Pixels from the base's own image processor, images decoded as the server decodes
    them (upright by EXIF, RGB; PNG or JPEG), read from disk batch by batch."""

    def __init__(self, ds: Dataset, processor: Any, device: torch.device, targets: list[int]) -> None:
        self.ds, self.processor, self.device, self.targets = ds, processor, device, targets

    def __len__(self) -> int:
        return len(self.ds)

    def batch(self, idx: list[int]) -> dict[str, Any]:
        images = []
        for i in idx:
            ex = self.ds.examples[i]
            where = f"{self.ds.path}:{ex.line}: image {ex.image}"
            try:
                images.append(decode_image(ex.image.read_bytes(), where=where))  # type: ignore[union-attr]
            except InvalidRequest as exc:
                raise TrainingDataError(str(exc)) from None
            except OSError as exc:
                raise TrainingDataError(f"{where}: cannot be read ({exc.strerror or exc})") from None
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {
            "image": {"pixel_values": pixels.to(self.device)},
            "labels": torch.tensor([self.targets[i] for i in idx], dtype=torch.long, device=self.device),
        }


def make_batches(
    ds: Dataset,
    *,
    tokenizer: Any,
    processor: Any,
    max_length: int | None,
    window_limit: int,
    device: torch.device,
    targets: list[int] | None,
) -> Batches:
    """The batches of `ds` for its task. `window_limit` bounds question-answering windows
    (min(384, it) tokens each, the server's rule); `max_length` bounds the other texts."""
    if ds.task is Task.QUESTION_ANSWERING:
        return QABatches(ds, tokenizer, window_limit, device)
    if ds.task is Task.IMAGE_CLASSIFICATION:
        assert targets is not None
        return ImageBatches(ds, processor, device, targets)
    return TextBatches(ds, tokenizer, max_length or DEFAULT_MAX_LENGTH, device, targets)
