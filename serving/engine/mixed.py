"""The unmerged path: one forward serving rows of several adapters (and the base) at once.

A CapaBoost update is an exact rank-(d*r) LoRA (adapters.merge.stacked_factors), so with the
PRISTINE base weights in place every target layer can compute

    y = x W^T + b + (x A'^T) B'^T          (scale already folded into B')

with each row's own pair. As in S-LoRA / Punica, rows are grouped by adapter: one pair of
thin matmuls per adapter present, added into the layer's output in place. The engine orders
a batch's rows by adapter (`adapter_order`), so each group is a slice of the batch: views
in, an in-place add out, no gather or scatter copies (any other order still works, through
index_select / index_add_). Base rows get no update.

A continuous-batching decoder's rows are in cache order, not adapter order, and each decode
step has one token per row, so there a per-group loop costs several small ops per adapter
and target (measured: a 16-row step with ~8 adapters took 57 ms against 15 ms merged).
`RowStacks` instead keeps, per target, every row's pair stacked and zero-padded to the
largest rank ([rows, in, R] and [rows, R, out], base rows all zero) and adds the update with
two batched matmuls per target; the stacks are rebuilt only when the rows' adapters change
(a sequence joins or leaves).
The update is added by forward hooks, installed on the target modules for the duration of
one forward only (`mixed_lora`), so the model object and its weights are never changed and
the merged path needs nothing undone. A hook indexes the leading dimension of the layer's
input: texts in a padded forward, tokens in an unpadded one (serving/engine/unpadded.py, whose
caller passes one row per token). A hook acts only on the thread that installed it:
other engine workers may run base or mixed forwards on the same pristine weights meanwhile.
Works for nn.Linear and GPT-2 Conv1D alike, since the factors are in nn.Linear orientation
and both produce [..., out].
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from serving.engine.weights import TargetDelta


def adapter_order(keys: Sequence[object]) -> list[int]:
    """Row indices with equal keys next to each other (adapters in order of first appearance)."""
    first: dict[object, int] = {}
    for k in keys:
        first.setdefault(k, len(first))
    return sorted(range(len(keys)), key=lambda i: first[keys[i]])


@dataclass
class _Group:
    """Rows of the batch that use one adapter's (B', A') on one target."""

    rows: slice | torch.Tensor  # a slice when the rows are contiguous, else their indices
    b: torch.Tensor
    a: torch.Tensor


def _rows(idx: list[int], device: torch.device) -> slice | torch.Tensor:
    if idx == list(range(idx[0], idx[-1] + 1)):
        return slice(idx[0], idx[-1] + 1)
    return torch.tensor(idx, dtype=torch.long, device=device)


def _plan(
    rows: Sequence[dict[str, TargetDelta] | None], device: torch.device
) -> dict[str, list[_Group]]:
    """target -> groups, from each row's factor dict (None: the base)."""
    by_adapter: dict[int, tuple[dict[str, TargetDelta], list[int]]] = {}
    for i, factors in enumerate(rows):
        if factors is not None:
            by_adapter.setdefault(id(factors), (factors, []))[1].append(i)
    plan: dict[str, list[_Group]] = {}
    for factors, idx in by_adapter.values():
        where = _rows(idx, device)
        for target, d in factors.items():
            assert d.b is not None and d.a is not None, f"target {target!r} has no factor pair"
            plan.setdefault(target, []).append(_Group(where, d.b, d.a))
    return plan


def _hook(groups: list[_Group], owner: int):  # noqa: ANN202 - a torch forward hook
    def add_updates(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if threading.get_ident() != owner:
            return output  # another thread's forward on the same (pristine) weights
        # `output` is the layer's fresh result (inference mode): updating it in place is safe
        x = args[0]
        for g in groups:
            if isinstance(g.rows, slice):
                delta = (x[g.rows].to(torch.float32) @ g.a.t()) @ g.b.t()
                output[g.rows] += delta.to(output.dtype)
            else:
                delta = (x.index_select(0, g.rows).to(torch.float32) @ g.a.t()) @ g.b.t()
                output.index_add_(0, g.rows, delta.to(output.dtype))
        return output

    return add_updates


class RowStacks:
    """Per-target stacked factor pairs for one batch's row order, kept while the rows' adapters
    stay the same, and each adapter's transposed pairs kept while it has a row, so a join or a
    leave restacks with one `torch.stack` per target and factor (the factor dicts are held
    here, so none is freed and its id reused meanwhile)."""

    def __init__(self) -> None:
        self._rows: list[dict[str, TargetDelta] | None] = []
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pairs: dict[int, tuple[dict[str, TargetDelta], dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}

    def get(
        self, rows: Sequence[dict[str, TargetDelta] | None], device: torch.device
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if len(rows) != len(self._rows) or any(a is not b for a, b in zip(rows, self._rows)):
            present = {id(f): f for f in rows if f is not None}
            self._pairs = {
                k: self._pairs[k] if k in self._pairs else (f, _transposed(f, device)) for k, f in present.items()
            }
            self._rows, self._stacks = list(rows), _stack(rows, {k: v[1] for k, v in self._pairs.items()}, device)
        return self._stacks


def _transposed(factors: dict[str, TargetDelta], device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """target -> (A'^T [in, R], B'^T [R, out]) of one adapter, contiguous float32."""
    out = {}
    for target, d in factors.items():
        assert d.b is not None and d.a is not None, f"target {target!r} has no factor pair"
        out[target] = (d.a.t().to(device, torch.float32).contiguous(), d.b.t().to(device, torch.float32).contiguous())
    return out


def _stack(
    rows: Sequence[dict[str, TargetDelta] | None],
    pairs: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]],
    device: torch.device,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """target -> (A^T stacked [rows, in, R], B^T stacked [rows, R, out]), zero where a row has
    none, each pair zero-padded to the largest rank R among the rows."""
    targets: dict[str, tuple[int, int, int]] = {}  # target -> (in, out, R)
    for f in rows:
        for target, (at, bt) in (pairs[id(f)] if f is not None else {}).items():
            n_in, n_out, rank = targets.get(target, (at.shape[0], bt.shape[1], 0))
            targets[target] = (n_in, n_out, max(rank, at.shape[1]))
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for target, (n_in, n_out, rank) in targets.items():
        zero_a = torch.zeros(n_in, rank, dtype=torch.float32, device=device)
        zero_b = torch.zeros(rank, n_out, dtype=torch.float32, device=device)
        ats, bts = [], []
        for f in rows:
            pair = pairs[id(f)].get(target) if f is not None else None
            if pair is None:
                ats.append(zero_a)
                bts.append(zero_b)
                continue
            at, bt = pair
            short = rank - at.shape[1]
            ats.append(torch.nn.functional.pad(at, (0, short)) if short else at)
            bts.append(torch.nn.functional.pad(bt, (0, 0, 0, short)) if short else bt)
        out[target] = (torch.stack(ats), torch.stack(bts))
    return out


def _stacked_hook(at: torch.Tensor, bt: torch.Tensor, owner: int):  # noqa: ANN202 - a torch forward hook
    def add_updates(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if threading.get_ident() != owner:
            return output
        x = args[0]
        flat = x.dim() == 2  # [rows, in]: one position per row
        x3 = x.unsqueeze(1) if flat else x
        delta = torch.bmm(torch.bmm(x3.to(torch.float32), at), bt)
        output += (delta.squeeze(1) if flat else delta).to(output.dtype)
        return output

    return add_updates


@contextmanager
def mixed_lora(
    model: torch.nn.Module,
    rows: Sequence[dict[str, TargetDelta] | None],
    device: torch.device,
    stacks: RowStacks | None = None,
) -> Iterator[None]:
    """Within the block, a forward of `model` on a batch adds row i's low-rank updates.

    `rows[i]` is row i's target -> TargetDelta(b, a) dict, or None for the base. The
    model's target weights must be the pristine base ones (the caller activates None).
    With `stacks` (a decoder's) the update is two batched matmuls per target, else one
    pair of matmuls per adapter group.
    """
    handles = []
    owner = threading.get_ident()
    try:
        if stacks is not None:
            for target, (at, bt) in stacks.get(rows, device).items():
                handles.append(model.get_submodule(target).register_forward_hook(_stacked_hook(at, bt, owner)))
        else:
            for target, groups in _plan(rows, device).items():
                handles.append(model.get_submodule(target).register_forward_hook(_hook(groups, owner)))
        yield
    finally:
        for h in handles:
            h.remove()
