"""The model being trained: a frozen transformers model whose target layers are wrapped
in `CapaBoostLinear`, plus the task's head of docs/bundle-format.md#task-heads. Everything
the served model computes is computed here the same way, so the exported bundle reproduces it:

- targets are module paths of `AutoModel` (every encoder task, text or image) or
  `AutoModelForCausalLM` (causal-lm), the classes the server loads;
- pooling is that of docs/bundle-format.md#pooling: mean over the attention mask (or the
  first token), and for embeddings L2-normalised; an image row has no padding;
- the classification head is dense -> tanh -> out on the pooled, unnormalised state (text),
  or out alone (images, as ViTForImageClassification); the question-answering head is one
  [2, hidden] layer on every token's state, giving start and end logits.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters.bundle import AdapterBundle, BundleMetadata, Task, TargetFactors
from adapters.capaboost_linear import CapaBoostLinear
from adapters.masks import mask_shape, seed_mask


def _is_linear(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    return isinstance(mod, Conv1D)


def match_targets(model: nn.Module, suffixes: list[str]) -> list[str]:
    """Full paths of the Linear/Conv1D modules whose name is, or ends in `.`, a suffix.

    Like PEFT's `target_modules`. Every suffix must match at least one layer, so a typo
    fails loudly instead of training nothing; the error lists what could be targeted.
    """
    linear = [name for name, mod in model.named_modules() if name and _is_linear(mod)]
    found: list[str] = []
    unmatched: list[str] = []
    for s in suffixes:
        hits = [n for n in linear if n == s or n.endswith("." + s)]
        if not hits:
            unmatched.append(s)
        found.extend(hits)
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(
            f"targets {unmatched} match no Linear/Conv1D layer of the model; layer names it has: {leaves}"
        )
    # keep model order, drop duplicates where two suffixes hit the same layer
    order = {n: i for i, n in enumerate(linear)}
    return sorted(set(found), key=order.__getitem__)


def attach_capaboost(
    model: nn.Module,
    paths: list[str],
    *,
    rank: int,
    num_copies: int,
    alpha: float,
    density: float,
    seed: int,
    mask_seed: int | None = None,
) -> dict[str, CapaBoostLinear]:
    """Freeze `model` and replace each target by a CapaBoostLinear, in place.

    One generator seeded with `seed` draws every A init (and the masks, target by target
    in model order); with `mask_seed` the masks are instead the bundle format's seed
    generator's, so a `seed` bundle of the trained model reproduces them exactly.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    wrapped: dict[str, CapaBoostLinear] = {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, child)
        m = CapaBoostLinear(base, rank, num_copies, alpha, density, generator=g)
        if mask_seed is not None:
            in_f, out_f = m.lora_A.shape[1], m.lora_B.shape[0]
            m.mask_A.copy_(seed_mask(mask_seed, path, "A", mask_shape("A", num_copies, rank, in_f, out_f), density))
            m.mask_B.copy_(seed_mask(mask_seed, path, "B", mask_shape("B", num_copies, rank, in_f, out_f), density))
        w = base.weight
        m.to(device=w.device)
        setattr(parent, child, m)
        wrapped[path] = m
    return wrapped


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the attention mask (docs/bundle-format.md#pooling), in float32."""
    m = attention_mask.to(torch.float32).unsqueeze(-1)
    return (hidden.to(torch.float32) * m).sum(1) / m.sum(1).clamp(min=1e-9)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """Head pooling (docs/bundle-format.md#pooling): `mean` over the mask, or `cls` (first token)."""
    if how == "cls":
        return hidden[:, 0].to(torch.float32)
    return mean_pool(hidden, attention_mask)


class ClassificationHead(nn.Module):
    """[head.dense (hidden x hidden) -> tanh ->] head.out (num_labels x hidden), as served."""

    def __init__(self, hidden: int, num_labels: int, *, dense: bool = True) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden) if dense else None
        self.out = nn.Linear(hidden, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.dense(pooled)) if self.dense is not None else pooled)


class QAHead(nn.Module):
    """head.qa [2, hidden]: start and end logits for every token, as served."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.qa = nn.Linear(hidden, 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.qa(hidden.to(torch.float32))


class AdaptedModel(nn.Module):
    """Base model + CapaBoost layers (+ head); forward returns what the server would.

    - sequence- and image-classification: logits [batch, num_labels] (softmax gives the served probs)
    - question-answering: logits [batch, tokens, 2] (start, end) of every position
    - feature-extraction: L2-normalised mean-pooled embeddings [batch, hidden]
    - causal-lm: the transformers output (logits, and loss when labels are given)
    """

    def __init__(
        self,
        base: nn.Module,
        task: Task,
        layers: dict[str, CapaBoostLinear],
        *,
        head: nn.Module | None = None,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        self.base = base
        self.task = task
        self.head = head
        self.pooling = pooling
        self._paths = list(layers)

    def layers(self) -> dict[str, CapaBoostLinear]:
        """The wrapped targets, by their path in the base model (the bundle's names)."""
        return {p: self.base.get_submodule(p) for p in self._paths}  # type: ignore[misc]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ):
        if self.task is Task.CAUSAL_LM:
            return self.base(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        if pixel_values is not None:
            hidden = self.base(pixel_values=pixel_values).last_hidden_state
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        else:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            hidden = self.base(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        assert attention_mask is not None
        if self.task is Task.FEATURE_EXTRACTION:
            return nn.functional.normalize(mean_pool(hidden, attention_mask), p=2, dim=-1)
        assert self.head is not None
        if self.task is Task.QUESTION_ANSWERING:
            return self.head(hidden)
        return self.head(pool(hidden, attention_mask, self.pooling))

    def to_bundle(self, metadata: BundleMetadata) -> AdapterBundle:
        """The bundle of exactly these factors and masks (never re-drawn), float32, on CPU."""
        targets: dict[str, TargetFactors] = {}
        for path, layer in self.layers().items():
            f = layer.factors()
            targets[path] = TargetFactors(
                lora_A=f.lora_A.float().cpu(),
                lora_B=f.lora_B.float().cpu(),
                mask_A=f.mask_A.bool().cpu(),
                mask_B=f.mask_B.bool().cpu(),
            )
        head: dict[str, torch.Tensor] = {}
        if self.head is not None:
            head = {
                f"head.{k}": v.detach().float().cpu().clone() for k, v in self.head.state_dict().items()
            }
        return AdapterBundle(metadata=metadata, targets=targets, head=head)
