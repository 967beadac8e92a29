"""`CapaBoostLinear`: the paper's unmerged layer, a base linear plus d masked copies of one
shared LoRA pair. It is the oracle for the merge and the module `capaserve train` wraps."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters.bundle import TargetFactors


def random_masks(d: int, shape: tuple[int, ...], density: float, generator: torch.Generator) -> torch.Tensor:
    """d static binary masks of `shape`, each entry kept with probability `density`."""
    return torch.rand((d, *shape), generator=generator) < density


class CapaBoostLinear(nn.Module):
    """y = base(x) + (alpha/r) * sum_i x (A*M_A[i])^T (B*M_B[i])^T, computed unmerged.

    `base` is an nn.Linear or a GPT-2 Conv1D; it is frozen. A and B are the only
    trainable tensors; the masks are buffers fixed at construction.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        num_copies: int,
        alpha: float,
        density: float = 0.5,
        *,
        generator: torch.Generator | None = None,
        in_features: int | None = None,
        out_features: int | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        if in_features is None or out_features is None:
            in_features, out_features = _linear_dims(base)
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.rank, self.num_copies, self.alpha, self.density = rank, num_copies, alpha, density
        self.scaling = alpha / rank
        a = torch.empty(rank, in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.register_buffer("mask_A", random_masks(num_copies, (rank, in_features), density, g))
        self.register_buffer("mask_B", random_masks(num_copies, (out_features, rank), density, g))
        self.to(next(base.parameters()).device)  # drawn on the CPU (seeded), kept beside the base layer

    @classmethod
    def from_factors(cls, base: nn.Module, f: TargetFactors, alpha: float) -> "CapaBoostLinear":
        """Wrap `base` with given factors and masks (as read from a bundle)."""
        r, d = f.lora_A.shape[0], f.mask_A.shape[0]
        m = cls(base, r, d, alpha, in_features=f.in_features, out_features=f.out_features)
        with torch.no_grad():
            m.lora_A.copy_(f.lora_A.float())
            m.lora_B.copy_(f.lora_B.float())
            m.mask_A.copy_(f.mask_A)
            m.mask_B.copy_(f.mask_B)
        return m

    def factors(self) -> TargetFactors:
        return TargetFactors(
            lora_A=self.lora_A.detach().clone(),
            lora_B=self.lora_B.detach().clone(),
            mask_A=self.mask_A.clone(),
            mask_B=self.mask_B.clone(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        xf = x.to(self.lora_A.dtype)
        update = torch.zeros_like(y, dtype=self.lora_A.dtype)
        for i in range(self.num_copies):
            a = self.lora_A * self.mask_A[i]
            b = self.lora_B * self.mask_B[i]
            update = update + (xf @ a.t()) @ b.t()
        return y + (self.scaling * update).to(y.dtype)


def _linear_dims(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.nf
    raise TypeError(f"CapaBoostLinear wraps nn.Linear or Conv1D, got {type(base).__name__}")


def wrap_targets(model: nn.Module, targets: dict[str, TargetFactors], alpha: float) -> nn.Module:
    """Replace each target module of `model` in place by a CapaBoostLinear (unmerged oracle)."""
    for path, f in targets.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, CapaBoostLinear.from_factors(getattr(parent, child), f, alpha))
    return model
