"""The training loop of `capaserve train`: frozen base, CapaBoost factors (and the task's
head) trained with AdamW, evaluated after every epoch, exported as a `capaboost.v1` bundle
holding exactly the trained factors and masks.

Library code with no CLI in it: tests and notebooks call `train(config)` and get the
live model back next to the bundle, so "the bundle reproduces the model" is checkable.
What each task feeds the model is in `adapters.training.batches`; question answering's
windows, labels and metrics in `adapters.training.qa`.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

from adapters.bundle import CLASSIFICATION_TASKS, AdapterBundle, BundleMetadata, Task, save_bundle
from adapters.device import resolve_device
from adapters.tasks.model_loader import detect_modality, max_positions_of
from adapters.training.batches import Batches, make_batches
from adapters.training.config import TrainConfig
from adapters.training.data import Dataset, label_ids, label_names, read_jsonl
from adapters.training.model import AdaptedModel, ClassificationHead, QAHead, attach_capaboost, match_targets
from adapters.training.qa import AnswerPicker, QABatches, qa_loss, squad_scores

#: Epochs when neither epochs nor steps is given.
DEFAULT_EPOCHS = 3

#: Fewer optimiser steps than this draw a warning: an adapter starts at ΔW = 0 (B is zero) and a
#: new head at random, and at the default lr (1e-3) they often do not move far enough in fewer. The
#: README's question-answering example (48 examples, batch 16) learned nothing in 2 epochs
#: (6 steps; exact match 0.08 before and after) and 11 of 12 new questions exactly in 40 (120 steps).
MIN_LEARNING_STEPS = 100


def few_steps_warning(total_steps: int, per_epoch: int, examples: int, batch_size: int) -> str | None:
    """The warning for a run of fewer than MIN_LEARNING_STEPS optimiser steps, else None."""
    if total_steps >= MIN_LEARNING_STEPS:
        return None
    return (
        f"warning: only {total_steps} optimiser steps ({examples} training rows, {per_epoch} step(s) per epoch "
        f"at batch {batch_size}); fewer than {MIN_LEARNING_STEPS} often learn nothing: raise --epochs "
        f"(about {math.ceil(MIN_LEARNING_STEPS / max(per_epoch, 1))}) or --steps, or add data"
    )


@dataclass
class EpochReport:
    """Figures after one epoch (or after the last, partial one when --steps ends mid-epoch)."""

    epoch: int
    step: int
    train_loss: float
    eval_loss: float
    eval_accuracy: float | None = None
    #: question-answering: SQuAD exact match and F1 of the served decode, in [0, 1]
    eval_exact_match: float | None = None
    eval_f1: float | None = None

    def figures(self) -> list[str]:
        """The eval metrics other than the loss, e.g. `accuracy 0.9500`."""
        out = [f"accuracy {self.eval_accuracy:.4f}"] if self.eval_accuracy is not None else []
        if self.eval_exact_match is not None and self.eval_f1 is not None:
            out += [f"exact match {self.eval_exact_match:.4f}", f"F1 {self.eval_f1:.4f}"]
        return out

    def eval_summary(self) -> str:
        return ", ".join([f"eval loss {self.eval_loss:.4f}", *self.figures()])

    def summary(self) -> str:
        return f"epoch {self.epoch} (step {self.step}): train loss {self.train_loss:.4f}, {self.eval_summary()}"


@dataclass
class TrainResult:
    """What a run produced: the bundle (as written), the live model and the figures."""

    bundle: AdapterBundle
    path: Path
    model: AdaptedModel
    tokenizer: Any  # None for an image base
    labels: list[str] | None
    initial_eval: EpochReport
    history: list[EpochReport] = field(default_factory=list)
    seconds: float = 0.0
    processor: Any = None  # the image processor of an image base
    #: what the run warned about (e.g. too few optimiser steps to learn)
    warnings: list[str] = field(default_factory=list)


def autocast_for(device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """bf16 autocast on CUDA that supports it; float32 everywhere else (CPU, older GPUs).

    The factors and the head stay float32 parameters either way, so the bundle is float32.
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


# --------------------------------------------------------------------------- loss and eval


def batch_loss(model: AdaptedModel, batch: dict[str, Any], temperature: float) -> tuple[torch.Tensor, int, int]:
    """(mean loss, number of items it averages over, correct predictions or 0).

    Items are tokens for causal-lm (so eval loss is a per-token mean over the whole set),
    windows for question-answering and examples otherwise.
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
    if model.task is Task.QUESTION_ANSWERING:
        logits = model(**batch["qa"])
        batch["logits"] = logits.detach()  # evaluation decodes the same forward's logits
        return qa_loss(logits, batch), logits.shape[0], 0
    logits = model(**batch["text" if "text" in batch else "image"]).float()
    labels = batch["labels"]
    correct = int((logits.argmax(-1) == labels).sum())
    return nn.functional.cross_entropy(logits, labels), labels.shape[0], correct


def _batches(n: int, size: int, order: list[int]) -> Iterator[list[int]]:
    for start in range(0, n, size):
        yield order[start : start + size]


@torch.no_grad()
def evaluate(
    model: AdaptedModel,
    data: Batches,
    ds: Dataset,
    cfg: TrainConfig,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    *,
    epoch: int,
    step: int,
    train_loss: float,
) -> EpochReport:
    """Loss over the whole eval set, in eval mode, and the task's metric: accuracy for
    classification, SQuAD exact match and F1 of the served decode for question answering."""
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    picker = AnswerPicker(data) if isinstance(data, QABatches) else None
    for idx in _batches(len(data), cfg.batch_size, list(range(len(data)))):
        batch = data.batch(idx)
        with autocast():
            loss, n, c = batch_loss(model, batch, cfg.temperature)
        total += float(loss) * n
        count += n
        correct += c
        if picker is not None:
            picker.add(batch["logits"], batch)
    model.train(was_training)
    report = EpochReport(epoch=epoch, step=step, train_loss=train_loss, eval_loss=total / max(count, 1))
    if model.task in CLASSIFICATION_TASKS:
        report.eval_accuracy = correct / len(ds)
    if picker is not None:
        report.eval_exact_match, report.eval_f1 = squad_scores(picker.answers(), ds)
    return report


# --------------------------------------------------------------------------- the run


def load_base(cfg: TrainConfig, device: torch.device) -> tuple[Any, Any, nn.Module]:
    """(tokenizer, image processor, float32 model): the class the server loads for this
    task, and what prepares its inputs (a tokenizer for text, the image processor for images)."""
    src = cfg.model_source()
    image_base = detect_modality(AutoConfig.from_pretrained(src)) == "image"
    if image_base != (cfg.task is Task.IMAGE_CLASSIFICATION):
        raise ValueError(
            f"{src!r} is an image model; it can be trained for image-classification only"
            if image_base
            else f"image-classification needs an image model (ViT, DeiT, ... with its image processor); {src!r} is not"
        )
    cls = AutoModelForCausalLM if cfg.task is Task.CAUSAL_LM else AutoModel
    model = cls.from_pretrained(src, dtype=torch.float32)
    if image_base:
        return None, AutoImageProcessor.from_pretrained(src), model.to(device)
    tok = AutoTokenizer.from_pretrained(src)
    if cfg.task is not Task.CAUSAL_LM and tok.pad_token is None:
        raise ValueError(f"the tokenizer of {src!r} has no pad token; cannot batch texts")
    if cfg.task is Task.QUESTION_ANSWERING and not tok.is_fast:
        raise ValueError(
            f"question-answering needs a fast tokenizer (its character offsets give the answer); {src!r} has none"
        )
    return tok, None, model.to(device)


def build_model(cfg: TrainConfig, base: nn.Module, num_labels: int | None, mask_seed: int) -> AdaptedModel:
    """Wrap the targets (masks from the seed generator of `mask_seed`) and add the task's head, seeded."""
    paths = match_targets(base, cfg.targets)
    layers = attach_capaboost(
        base, paths, rank=cfg.rank, num_copies=cfg.num_copies, alpha=cfg.alpha, density=cfg.density, seed=cfg.seed,
        mask_seed=mask_seed,
    )
    hidden = int(base.config.hidden_size)
    head: nn.Module | None = None
    if cfg.task in CLASSIFICATION_TASKS:
        assert num_labels is not None
        head = ClassificationHead(hidden, num_labels, dense=cfg.task is Task.SEQUENCE_CLASSIFICATION)
    elif cfg.task is Task.QUESTION_ANSWERING:
        head = QAHead(hidden)
    if head is not None:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.no_grad():  # seeded init, independent of the global RNG state
            bound = 1.0 / math.sqrt(hidden)
            for lin in (m for m in head.modules() if isinstance(m, nn.Linear)):
                lin.weight.copy_(torch.empty_like(lin.weight).uniform_(-bound, bound, generator=g))
                lin.bias.zero_()
        head.to(next(base.parameters()).device)
    return AdaptedModel(base, cfg.task, layers, head=head, pooling=cfg.resolved_pooling or "mean")


def describe(cfg: TrainConfig, train_ds: Dataset, eval_name: str, reports: list[EpochReport], mask_seed: int) -> str:
    """The bundle's `description`: how it was trained and the eval figures (epoch 0 is
    before training), one line."""
    parts = [
        f"capaserve train: {cfg.task.value} on {train_ds.path.name} ({len(train_ds)} examples)",
        f"{reports[-1].step} steps, lr {cfg.lr:g}, batch {cfg.batch_size}, seed {cfg.seed}, mask_seed {mask_seed}",
    ]
    figs = [" ".join([f"epoch {r.epoch}: loss {r.eval_loss:.4f}", *r.figures()]) for r in reports]
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
    labels = label_names(train_ds) if cfg.task in CLASSIFICATION_TASKS else None
    train_targets = label_ids(train_ds, labels) if labels else None
    eval_targets = label_ids(eval_ds, labels) if labels else None

    device = resolve_device(cfg.device)
    autocast = autocast_for(device)
    torch.manual_seed(cfg.seed)  # dropout
    tok, processor, base = load_base(cfg, device)
    # the masks always come from the format's generator: any encoding can then store them
    mask_seed = cfg.mask_seed if cfg.mask_seed is not None else secrets.randbits(64)
    model = build_model(cfg, base, len(labels) if labels else None, mask_seed)
    # question-answering windows: training's from --max-length, evaluation's the server's own
    limit = max_positions_of(base.config)
    inputs = {"tokenizer": tok, "processor": processor, "max_length": cfg.max_length, "device": device}
    train_data = make_batches(train_ds, window_limit=min(limit, cfg.max_length or limit), targets=train_targets, **inputs)
    eval_data = make_batches(eval_ds, window_limit=limit, targets=eval_targets, **inputs)
    params = model.trainable_parameters()
    n_params = sum(p.numel() for p in params)
    emit(
        f"training {len(model.layers())} target layers (r={cfg.rank}, d={cfg.num_copies}, density {cfg.density})"
        f"{' + head' if model.head is not None else ''}: {n_params:,} trainable parameters on {device}, "
        f"mask_seed {mask_seed}"
    )
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total_steps = cfg.steps if cfg.steps is not None else per_epoch * (cfg.epochs or DEFAULT_EPOCHS)
    warnings = [w] if (w := few_steps_warning(total_steps, per_epoch, len(train_data), cfg.batch_size)) else []
    for w in warnings:
        emit(w)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    initial = evaluate(model, eval_data, eval_ds, cfg, autocast, epoch=0, step=0, train_loss=float("nan"))
    emit(f"before training: {initial.eval_summary()}")

    history: list[EpochReport] = []
    model.train()
    step, epoch = 0, 0
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not cfg.progress, file=sys.stderr)
    running: float | None = None
    while step < total_steps:
        epoch += 1
        order = torch.randperm(len(train_data), generator=shuffle).tolist()
        epoch_loss, epoch_batches = 0.0, 0
        for idx in _batches(len(train_data), cfg.batch_size, order):
            with autocast():
                loss, _, _ = batch_loss(model, train_data.batch(idx), cfg.temperature)
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
            model, eval_data, eval_ds, cfg, autocast,
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
        pooling=cfg.resolved_pooling,
        description=describe(cfg, train_ds, eval_name, [initial, *history], mask_seed),
    )
    bundle = model.to_bundle(meta).with_encoding(cfg.mask_encoding, mask_seed if cfg.mask_encoding == "seed" else None)
    path = save_bundle(bundle, cfg.output)
    result = TrainResult(
        bundle=bundle, path=path, model=model, tokenizer=tok, labels=labels,
        history=history, initial_eval=initial, seconds=time.monotonic() - t0, processor=processor,
        warnings=warnings,
    )
    emit(f"wrote {result.path} ({len(meta.targets)} targets, base_model {meta.base_model!r}) in {result.seconds:.1f}s")
    for w in warnings:  # once more, last: the progress bar and epochs pushed it out of sight
        emit(w)
    return result
