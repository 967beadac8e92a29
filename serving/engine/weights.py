"""Pristine copies of targeted weights and the in-place swap.

Every write computes `weight = cast(pristine + delta)` into the SAME tensor storage (the
parameter object and its data_ptr never change, so CUDA graphs / compiled modules stay
valid), and never subtracts a previous delta: that is what makes A->B->A bit-identical
and restores the base exactly. Pristine copies exist only for targets some loaded adapter
uses (reference counted), since a model's full copy would double its memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

from adapters.merge import add_dense_into, merge_into


@dataclass
class TargetDelta:
    """One target's pre-merged update: a dense float32 delta in the weight's own orientation,
    or the exact stacked factor pair (B' [out, d*r], A' [d*r, in]) in float32."""

    dense: torch.Tensor | None = None
    b: torch.Tensor | None = None
    a: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.dense, self.b, self.a) if t is not None)


@dataclass
class _Slot:
    weight: torch.Tensor
    transposed: bool
    pristine: torch.Tensor | None = None
    users: int = 0


class WeightBank:
    """Owns the target weights of one model: their pristine copies and every write to them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._modules: dict[str, tuple[torch.Tensor, bool]] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                self._modules[name] = (mod.weight, False)
            elif isinstance(mod, Conv1D):  # stores [in, out]
                self._modules[name] = (mod.weight, True)
        counts: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        self._tied = {n for n, (w, _) in self._modules.items() if counts.get(id(w), 0) > 1}
        self._slots: dict[str, _Slot] = {}

    def weight(self, path: str) -> torch.Tensor:
        return self._modules[path][0]

    def transposed(self, path: str) -> bool:
        return self._modules[path][1]

    def problems(self, path: str) -> list[str]:
        """Why `path` cannot be a swap target (empty when it can)."""
        if path not in self._modules:
            return [f"target {path!r} is not a Linear/Conv1D module of the base model"]
        w = self._modules[path][0]
        out: list[str] = []
        if path in self._tied:
            out.append(f"target {path!r} shares its weight with another module (tied); it cannot be merged")
        if not w.is_floating_point():
            out.append(f"target {path!r}: base weight dtype {w.dtype} is not floating point")
        return out

    def check(self, path: str, delta: TargetDelta | None) -> list[str]:
        """Shape/dtype/device check of one pending write, done for all targets before any write."""
        if path not in self._slots or self._slots[path].pristine is None:
            return [f"target {path!r} has no pristine copy"]
        w = self._slots[path].weight
        if delta is None:
            return []
        if delta.dense is not None:
            t = delta.dense
            if t.shape != w.shape or t.dtype != torch.float32 or t.device != w.device:
                return [f"target {path!r}: dense delta {list(t.shape)} {t.dtype} {t.device} != weight {list(w.shape)}"]
            return []
        b, a = delta.b, delta.a
        if b is None or a is None:
            return [f"target {path!r}: delta has neither a dense tensor nor factors"]
        out_f, in_f = (w.shape[1], w.shape[0]) if self.transposed(path) else (w.shape[0], w.shape[1])
        if b.shape[0] != out_f or a.shape[1] != in_f or b.shape[1] != a.shape[0] or b.device != w.device:
            return [f"target {path!r}: factors {list(b.shape)} x {list(a.shape)} do not fit weight {list(w.shape)}"]
        return []

    def acquire(self, paths: list[str]) -> None:
        """Keep pristine copies of `paths` (taken now: a target nobody uses is at base)."""
        for p in paths:
            slot = self._slots.get(p)
            if slot is None:
                w, tr = self._modules[p]
                slot = self._slots[p] = _Slot(weight=w, transposed=tr)
            if slot.pristine is None:
                with torch.no_grad():
                    slot.pristine = slot.weight.detach().clone()
            slot.users += 1

    def release(self, paths: list[str]) -> None:
        """Drop pristine copies no loaded adapter needs (the caller restored them first)."""
        for p in paths:
            slot = self._slots[p]
            slot.users -= 1
            if slot.users <= 0:
                del self._slots[p]

    @torch.no_grad()
    def write(self, changes: dict[str, TargetDelta | None]) -> None:
        """Apply all writes (None restores the base); callers ran `check` on each first."""
        for path, delta in changes.items():
            slot = self._slots[path]
            assert slot.pristine is not None
            if delta is None:
                slot.weight.copy_(slot.pristine)
            elif delta.dense is not None:
                add_dense_into(slot.weight, slot.pristine, delta.dense)
            else:
                assert delta.b is not None and delta.a is not None
                merge_into(slot.weight, slot.pristine, delta.b, delta.a, transposed=slot.transposed)

    def pristine_bytes(self) -> int:
        return sum(s.pristine.numel() * s.pristine.element_size() for s in self._slots.values() if s.pristine is not None)
