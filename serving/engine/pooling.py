"""Pooling (docs/bundle-format.md#pooling): mean over the attention mask (then L2 normalisation for embeddings, as
sentence-transformers does for all-MiniLM-L6-v2) and the classification head. float32."""

from __future__ import annotations

import torch


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n, L, H] x [n, L] -> [n, H]: the mean of the unmasked token states."""
    m = mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * m).sum(dim=1)
    return summed / m.sum(dim=1).clamp(min=1e-9)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, p=2.0, dim=-1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """`mean` over the mask or `cls` (the first token), float32, not normalised."""
    if how == "cls":
        return hidden[:, 0].to(torch.float32)
    return mean_pool(hidden, mask)


def classification_head(pooled: torch.Tensor, head: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits: (dense then tanh, if present), then out."""
    x = pooled
    if "head.dense.weight" in head:
        x = torch.tanh(torch.nn.functional.linear(x, head["head.dense.weight"], head["head.dense.bias"]))
    return torch.nn.functional.linear(x, head["head.out.weight"], head["head.out.bias"])
