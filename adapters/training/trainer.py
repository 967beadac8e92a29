"""The training loop of `capaserve train`: frozen base, CapaBoost factors (and the
classification head) trained with AdamW, evaluated after every epoch, exported as a
`capaboost.v1` bundle holding exactly the trained factors and masks.

Library code with no CLI in it: tests and notebooks call `train(config)` and get the
live model back next to the bundle, so "the bundle reproduces the model" is checkable.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from adapters.bundle import AdapterBundle, BundleMetadata, Task, save_bundle
from adapters.device import resolve_device
from adapters.training.config import TrainConfig
from adapters.training.data import Dataset, label_ids, label_names, read_jsonl
from adapters.training.model import AdaptedModel, ClassificationHead, attach_capaboost, match_targets

#: Epochs when neither epochs nor steps is given.
DEFAULT_EPOCHS = 3


@dataclass
class EpochReport:
    """Figures after one epoch (or after the last, partial one when --steps ends mid-epoch)."""

    epoch: int
    step: int
    train_loss: float
    eval_loss: float
    eval_accuracy: float | None = None

    def eval_summary(self) -> str:
        acc = f", accuracy {self.eval_accuracy:.4f}" if self.eval_accuracy is not None else ""
        return f"eval loss {self.eval_loss:.4f}{acc}"

    def summary(self) -> str:
        return f"epoch {self.epoch} (step {self.step}): train loss {self.train_loss:.4f}, {self.eval_summary()}"


@dataclass
class TrainResult:
    """What a run produced: the bundle (as written), the live model and the figures."""

    bundle: AdapterBundle
    path: Path
    model: AdaptedModel
    tokenizer: Any
    labels: list[str] | None
    initial_eval: EpochReport
    history: list[EpochReport] = field(default_factory=list)
    seconds: float = 0.0


def autocast_for(device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """bf16 autocast on CUDA that supports it; float32 everywhere else (CPU, older GPUs).

    The factors and the head stay float32 parameters either way, so the bundle is float32.
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


# --------------------------------------------------------------------------- batches


class Batcher:
    """Turns examples into padded tensors for one task; knows nothing of the loop."""

    def __init__(self, tokenizer: Any, task: Task, max_length: int, device: torch.device) -> None:
        self.tok, self.task, self.max_length, self.device = tokenizer, task, max_length, device
        if task is Task.CAUSAL_LM:
            self.eos = tokenizer.eos_token_id
            pad = tokenizer.pad_token_id
            self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)

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

    def __call__(self, ds: Dataset, idx: list[int], targets: list[int] | None) -> dict[str, Any]:
        ex = [ds.examples[i] for i in idx]
        if self.task is Task.CAUSAL_LM:
            return {"lm": self._encode_lm([e.text for e in ex])}  # type: ignore[misc]
        if self.task is Task.FEATURE_EXTRACTION:
            return {
                "anchor": self._encode([e.anchor for e in ex]),  # type: ignore[misc]
                "positive": self._encode([e.positive for e in ex]),  # type: ignore[misc]
            }
        assert targets is not None
        return {
            "text": self._encode([e.text for e in ex]),  # type: ignore[misc]
            "labels": torch.tensor([targets[i] for i in idx], dtype=torch.long, device=self.device),
        }


def batch_loss(model: AdaptedModel, batch: dict[str, Any], temperature: float) -> tuple[torch.Tensor, int, int]:
    """(mean loss, number of items it averages over, correct predictions or 0).

    Items are tokens for causal-lm (so eval loss is a per-token mean over the whole set)
    and examples otherwise.
    """
    if model.task is Task.CAUSAL_LM:
        lm = batch["lm"]
        out = model(**lm)
        n_tokens = int((lm["labels"][:, 1:] != -100).sum())
        return out.loss, max(n_tokens, 1), 0
    if model.task is Task.FEATURE_EXTRACTION:
        a = model(**batch["anchor"])
        p = model(**batch["positive"])
        # in-batch negatives: anchor i must pick positive i among all positives of the batch
        sim = (a.float() @ p.float().t()) / temperature
        target = torch.arange(sim.shape[0], device=sim.device)
        return nn.functional.cross_entropy(sim, target), sim.shape[0], 0
    logits = model(**batch["text"]).float()
    labels = batch["labels"]
    correct = int((logits.argmax(-1) == labels).sum())
    return nn.functional.cross_entropy(logits, labels), labels.shape[0], correct


def _batches(n: int, size: int, order: list[int]) -> Iterator[list[int]]:
    for start in range(0, n, size):
        yield order[start : start + size]


@torch.no_grad()
def evaluate(
    model: AdaptedModel,
    ds: Dataset,
    batcher: Batcher,
    targets: list[int] | None,
    cfg: TrainConfig,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    *,
    epoch: int,
    step: int,
    train_loss: float,
) -> EpochReport:
    """Loss (and accuracy for classification) over the whole eval set, in eval mode."""
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    for idx in _batches(len(ds), cfg.batch_size, list(range(len(ds)))):
        with autocast():
            loss, n, c = batch_loss(model, batcher(ds, idx, targets), cfg.temperature)
        total += float(loss) * n
        count += n
        correct += c
    model.train(was_training)
    acc = correct / len(ds) if model.task is Task.SEQUENCE_CLASSIFICATION else None
    return EpochReport(epoch=epoch, step=step, train_loss=train_loss, eval_loss=total / max(count, 1), eval_accuracy=acc)


# --------------------------------------------------------------------------- the run


def load_base(cfg: TrainConfig, device: torch.device) -> tuple[Any, nn.Module]:
    """Tokenizer and float32 model of the class the server loads for this task."""
    src = cfg.model_source()
    tok = AutoTokenizer.from_pretrained(src)
    cls = AutoModelForCausalLM if cfg.task is Task.CAUSAL_LM else AutoModel
    model = cls.from_pretrained(src, dtype=torch.float32)
    if cfg.task is not Task.CAUSAL_LM and tok.pad_token is None:
        raise ValueError(f"the tokenizer of {src!r} has no pad token; cannot batch texts")
    return tok, model.to(device)


def build_model(cfg: TrainConfig, base: nn.Module, num_labels: int | None) -> AdaptedModel:
    """Wrap the targets (masks drawn from cfg.seed) and, for classification, add the head."""
    paths = match_targets(base, cfg.targets)
    layers = attach_capaboost(
        base, paths, rank=cfg.rank, num_copies=cfg.num_copies, alpha=cfg.alpha, density=cfg.density, seed=cfg.seed
    )
    head = None
    if cfg.task is Task.SEQUENCE_CLASSIFICATION:
        assert num_labels is not None
        hidden = int(base.config.hidden_size)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        head = ClassificationHead(hidden, num_labels)
        with torch.no_grad():  # seeded init, independent of the global RNG state
            bound = 1.0 / math.sqrt(hidden)
            for lin in (head.dense, head.out):
                lin.weight.copy_(torch.empty_like(lin.weight).uniform_(-bound, bound, generator=g))
                lin.bias.zero_()
        head.to(next(base.parameters()).device)
    return AdaptedModel(base, cfg.task, layers, head=head, pooling=cfg.pooling)


def describe(cfg: TrainConfig, train_ds: Dataset, eval_name: str, reports: list[EpochReport]) -> str:
    """The bundle's `description`: how it was trained and the eval figures (epoch 0 is
    before training), one line."""
    parts = [
        f"capaserve train: {cfg.task.value} on {train_ds.path.name} ({len(train_ds)} examples)",
        f"{reports[-1].step} steps, lr {cfg.lr:g}, batch {cfg.batch_size}, seed {cfg.seed}",
    ]
    figs = []
    for r in reports:
        acc = f" accuracy {r.eval_accuracy:.4f}" if r.eval_accuracy is not None else ""
        figs.append(f"epoch {r.epoch}: loss {r.eval_loss:.4f}{acc}")
    parts.append(f"eval on {eval_name}: " + "; ".join(figs))
    return ". ".join(parts)


def train(cfg: TrainConfig, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run one training and write the bundle to cfg.output; returns the live model too."""
    t0 = time.monotonic()
    emit = log or (lambda s: tqdm.write(s, file=sys.stderr))
    # data first: a bad line fails before the (slow) model load
    train_ds = read_jsonl(cfg.data, cfg.task)
    eval_ds = read_jsonl(cfg.eval_data, cfg.task) if cfg.eval_data is not None else train_ds
    eval_name = cfg.eval_data.name if cfg.eval_data is not None else f"{train_ds.path.name} (training data)"
    labels = label_names(train_ds) if cfg.task is Task.SEQUENCE_CLASSIFICATION else None
    train_targets = label_ids(train_ds, labels) if labels else None
    eval_targets = label_ids(eval_ds, labels) if labels else None

    device = resolve_device(cfg.device)
    autocast = autocast_for(device)
    torch.manual_seed(cfg.seed)  # dropout
    tok, base = load_base(cfg, device)
    model = build_model(cfg, base, len(labels) if labels else None)
    params = model.trainable_parameters()
    n_params = sum(p.numel() for p in params)
    emit(
        f"training {len(model.layers())} target layers (r={cfg.rank}, d={cfg.num_copies}, density {cfg.density})"
        f"{' + head' if model.head is not None else ''}: {n_params:,} trainable parameters on {device}"
    )
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batcher = Batcher(tok, cfg.task, cfg.max_length, device)

    per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    total_steps = cfg.steps if cfg.steps is not None else per_epoch * (cfg.epochs or DEFAULT_EPOCHS)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    initial = evaluate(model, eval_ds, batcher, eval_targets, cfg, autocast, epoch=0, step=0, train_loss=float("nan"))
    emit(f"before training: {initial.eval_summary()}")

    history: list[EpochReport] = []
    model.train()
    step, epoch = 0, 0
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not cfg.progress, file=sys.stderr)
    running: float | None = None
    while step < total_steps:
        epoch += 1
        order = torch.randperm(len(train_ds), generator=shuffle).tolist()
        epoch_loss, epoch_batches = 0.0, 0
        for idx in _batches(len(train_ds), cfg.batch_size, order):
            with autocast():
                loss, _, _ = batch_loss(model, batcher(train_ds, idx, train_targets), cfg.temperature)
            if not torch.isfinite(loss):
                bar.close()
                raise FloatingPointError(f"loss became {float(loss)} at step {step + 1}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            step += 1
            lv = float(loss.detach())
            epoch_loss += lv
            epoch_batches += 1
            running = lv if running is None else 0.9 * running + 0.1 * lv
            bar.set_postfix(loss=f"{running:.4f}", epoch=epoch)
            bar.update(1)
            if step >= total_steps:
                break
        report = evaluate(
            model, eval_ds, batcher, eval_targets, cfg, autocast,
            epoch=epoch, step=step, train_loss=epoch_loss / max(epoch_batches, 1),
        )
        history.append(report)
        emit(report.summary())
    bar.close()
    model.eval()

    meta = BundleMetadata(
        base_model=cfg.resolved_base_model_id,
        task=cfg.task,
        rank=cfg.rank,
        num_copies=cfg.num_copies,
        alpha=cfg.alpha,
        density=cfg.density,
        targets=list(model.layers()),
        labels=labels,
        pooling=cfg.pooling if cfg.task is Task.SEQUENCE_CLASSIFICATION else None,
        description=describe(cfg, train_ds, eval_name, [initial, *history]),
    )
    bundle = model.to_bundle(meta)
    path = save_bundle(bundle, cfg.output)
    result = TrainResult(
        bundle=bundle, path=path, model=model, tokenizer=tok, labels=labels,
        history=history, initial_eval=initial, seconds=time.monotonic() - t0,
    )
    emit(f"wrote {result.path} ({len(meta.targets)} targets, base_model {meta.base_model!r}) in {result.seconds:.1f}s")
    return result
