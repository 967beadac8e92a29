"""Task heads that PEFT saved through `modules_to_save`, mapped onto a bundle's head.

What each transformers task model computes after its encoder (from transformers' own
modeling code), and what the bundle holds for it (docs/bundle-format.md#task-heads).
The backbone is the task model's `base_model_prefix`, the first part of every LoRA path:

| saved module | task model (backbone) | computation | bundle |
|---|---|---|---|
| `qa_outputs` [2, hidden] | any encoder's ForQuestionAnswering | start and end logit of every token | `head.qa.*` |
| `classifier.dense`, `classifier.out_proj` | RoBERTa, XLM-R, CamemBERT (`roberta`), MPNet (`mpnet`) ForSequenceClassification | first token, dense, tanh, out_proj | `head.dense.*`, `head.out.*`, pooling cls |
| `classifier` (one Linear) | BertForSequenceClassification (`bert`) | the base's pooler (first token, `pooler.dense`, tanh), then classifier | `head.dense.*` = the pooler's weights, `head.out.*` = classifier, pooling cls |
| `classifier` (one Linear) | ViT, DeiT ForImageClassification (`vit`, `deit`) | first token of the final hidden state, classifier | `head.out.*`, pooling cls |

Everything else is refused with a message naming the module and why: `score` (decoder
models' sequence classifiers read the last non-padding token, which no bundle pooling
does), ELECTRA's head (gelu, not tanh), DistilBERT's (relu), DeBERTa's (a pooler of its
own outside the saved module), or any other saved module (a layer norm, an embedding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from adapters.bundle import CLASSIFICATION_TASKS, Task
from adapters.importers.common import ConversionError

#: Top-level modules of transformers task models that hold the task head.
HEAD_MODULES = ("classifier", "qa_outputs", "score")
#: Backbones whose classifier reads the first token directly (image classifiers).
IMAGE_BACKBONES = ("vit", "deit")
#: Backbones whose classifier is dense -> tanh -> out_proj on the first token.
TANH_HEAD_BACKBONES = ("roberta", "mpnet")
#: Backbones whose one-Linear classifier reads the base's pooler (dense + tanh on the first token).
POOLER_BACKBONES = ("bert",)

#: (weight [hidden, hidden], bias [hidden]) of the pooler's dense layer, as the served base computes it.
PoolerSource = Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SavedHead:
    """The tensors of one saved head module, named relative to it (`weight`, `dense.bias`, ...)."""

    module: str
    tensors: dict[str, torch.Tensor]

    def shapes(self) -> str:
        return ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(self.tensors.items()))


@dataclass
class MappedHead:
    """A saved head as bundle head tensors, with the metadata it implies."""

    tensors: dict[str, torch.Tensor]
    pooling: str | None
    num_labels: int | None


def task_of(head: SavedHead, backbone: str | None) -> Task:
    """The bundle task a saved head implies (used when neither the caller nor PEFT's task_type says)."""
    if head.module == "qa_outputs":
        return Task.QUESTION_ANSWERING
    return Task.IMAGE_CLASSIFICATION if backbone in IMAGE_BACKBONES else Task.SEQUENCE_CLASSIFICATION


def map_head(head: SavedHead, task: Task, backbone: str | None, pooler: PoolerSource) -> MappedHead:
    """The bundle head of `task` from `head`; ConversionError naming the layout if it has none."""
    t, name = head.tensors, f"saved head {head.module!r} ({head.shapes()})"
    model = f"a {backbone!r} model" if backbone else "a model whose backbone prefix is not known"
    if task is Task.QUESTION_ANSWERING:
        w, b = t.get("weight"), t.get("bias")
        if head.module != "qa_outputs" or set(t) != {"weight", "bias"} or w is None or w.ndim != 2 or w.shape[0] != 2:
            raise ConversionError(
                f"{name} is not a question-answering head: expected qa_outputs weight [2, hidden] and bias [2]"
            )
        return MappedHead({"head.qa.weight": w, "head.qa.bias": b}, None, None)  # type: ignore[dict-item]
    if task not in CLASSIFICATION_TASKS:
        raise ConversionError(f"task {task.value} has no head; {name} cannot be carried")
    if head.module == "score":
        raise ConversionError(
            f"{name} cannot be mapped: `score` is a decoder's sequence classifier, which reads the last "
            "non-padding token; a bundle's classification pools the first token (cls) or the mean"
        )
    if head.module != "classifier":
        raise ConversionError(f"{name} is not a classification head (expected 'classifier')")
    if set(t) == {"dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"}:
        if backbone not in TANH_HEAD_BACKBONES:
            raise ConversionError(
                f"{name} on {model} cannot be mapped: a bundle's dense head applies tanh, which "
                f"only the classifiers of {', '.join(TANH_HEAD_BACKBONES)} models do"
            )
        return _classifier(t["out_proj.weight"], t["out_proj.bias"], t["dense.weight"], t["dense.bias"])
    if set(t) == {"weight", "bias"}:
        if backbone in IMAGE_BACKBONES:
            return _classifier(t["weight"], t["bias"])
        if backbone in POOLER_BACKBONES:
            return _classifier(t["weight"], t["bias"], *pooler())
        raise ConversionError(
            f"{name} on {model} cannot be mapped: a one-layer classifier is known to read the "
            f"first token ({', '.join(IMAGE_BACKBONES)}) or the pooler ({', '.join(POOLER_BACKBONES)}) only"
        )
    raise ConversionError(f"{name} has a layout no bundle head can express")


def _classifier(
    out_w: torch.Tensor, out_b: torch.Tensor, dense_w: torch.Tensor | None = None, dense_b: torch.Tensor | None = None
) -> MappedHead:
    if out_w.ndim != 2 or out_b.shape != out_w.shape[:1]:
        raise ConversionError(
            "classifier out layer: expected weight [labels, hidden] and bias [labels], "
            f"got {list(out_w.shape)} and {list(out_b.shape)}"
        )
    tensors = {"head.out.weight": out_w, "head.out.bias": out_b}
    if dense_w is not None and dense_b is not None:
        tensors = {"head.dense.weight": dense_w, "head.dense.bias": dense_b, **tensors}
    return MappedHead(tensors, "cls", int(out_w.shape[0]))
