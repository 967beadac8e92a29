"""The merge math: the single source of a target's delta_W (docs/merge.md#merge-rule).

    delta_W = (alpha / r) * sum_i (B * M_B[i]) @ (A * M_A[i])
            = B' @ A',  B' = scale * [B*M_B[0] | ... | B*M_B[d-1]]  [out, d*r]
                        A' = [A*M_A[0]; ...; A*M_A[d-1]]             [d*r, in]

so a CapaBoost update is an exact rank-(d*r) LoRA. Everything is float32; the cast to the
model dtype happens once, when the merged weight is written.
"""

from __future__ import annotations

import torch

from adapters.bundle import TargetFactors


def stacked_factors(f: TargetFactors, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact rank-(d*r) pair (B' [out, d*r], A' [d*r, in]) in float32, scale folded into B'."""
    A = f.lora_A.to(torch.float32)
    B = f.lora_B.to(torch.float32)
    d = f.mask_A.shape[0]
    # [d, r, in] -> [d*r, in]: copy i occupies rows i*r .. (i+1)*r
    a_stack = (A.unsqueeze(0) * f.mask_A.to(torch.float32)).reshape(d * A.shape[0], A.shape[1])
    # [d, out, r] -> [out, d, r] -> [out, d*r]: copy i occupies columns i*r .. (i+1)*r
    b_stack = (B.unsqueeze(0) * f.mask_B.to(torch.float32)).permute(1, 0, 2).reshape(B.shape[0], d * B.shape[1])
    return (b_stack * scaling).contiguous(), a_stack.contiguous()


def delta_weight(f: TargetFactors, scaling: float) -> torch.Tensor:
    """Dense delta_W [out, in] in float32 (nn.Linear orientation)."""
    b, a = stacked_factors(f, scaling)
    return b @ a


def merged_weight(
    pristine: torch.Tensor,
    b_stack: torch.Tensor,
    a_stack: torch.Tensor,
    *,
    transposed: bool = False,
) -> torch.Tensor:
    """W + B'A' with one addmm in float32, returned in float32.

    `transposed` is for layers storing the weight as [in, out] (GPT-2's Conv1D): then
    the product is A'^T B'^T, still one addmm.
    """
    w = pristine.to(torch.float32)
    if transposed:
        return torch.addmm(w, a_stack.t(), b_stack.t())
    return torch.addmm(w, b_stack, a_stack)


def merge_into(
    weight: torch.Tensor,
    pristine: torch.Tensor,
    b_stack: torch.Tensor,
    a_stack: torch.Tensor,
    *,
    transposed: bool = False,
) -> None:
    """Rewrite `weight` in place as cast(pristine + B'A'); never reads `weight` itself.

    Computing from the pristine copy (never by subtracting a previous delta) is what makes
    A->B->A bit-identical and restores the base exactly.
    """
    if weight.dtype == torch.float32 and pristine.dtype == torch.float32:
        if transposed:
            torch.addmm(pristine, a_stack.t(), b_stack.t(), out=weight)
        else:
            torch.addmm(pristine, b_stack, a_stack, out=weight)
        return
    weight.copy_(merged_weight(pristine, b_stack, a_stack, transposed=transposed))


def add_dense_into(weight: torch.Tensor, pristine: torch.Tensor, delta: torch.Tensor) -> None:
    """Rewrite `weight` in place as cast(pristine + delta): one fused add.

    `delta` is float32 in the weight's own orientation; for a low-precision weight the
    add runs in float32 (type promotion) and the result is cast once on write.
    """
    torch.add(pristine, delta, out=weight)


def rank_of(f: TargetFactors, scaling: float, *, rtol: float = 1e-5) -> int:
    """Numerical rank of delta_W (computed from the thin factors; at most d*r)."""
    b, a = stacked_factors(f, scaling)
    # rank(B'A') via the small [d*r, d*r] core: QR of each factor, then SVD of R_b R_a^T
    _, rb = torch.linalg.qr(b.double())
    _, ra = torch.linalg.qr(a.t().double())
    s = torch.linalg.svdvals(rb @ ra.t())
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > s[0] * rtol).sum())
