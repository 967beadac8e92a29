"""Adapters' pre-merged data, and the LRU that bounds it in bytes.

Each adapter is pre-merged once, when loaded, in one of two forms per target:
- dense: the float32 delta in the weight's own orientation; a swap is one fused add;
- factors: the exact stacked pair (B', A') of rank d*r; a swap is one addmm, and it holds
  (out+in)*d*r floats instead of out*in.
Dense is chosen while the adapter's dense deltas fit what is left of `dense_budget_bytes`.
A dense adapter also keeps its factor pair (`factors`, counted in its bytes): the unmerged
mixed-adapter path (serving.engine.mixed) needs the thin pair, never the dense delta.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch

from adapters.bundle import AdapterBundle, BundleMetadata, TargetFactors, Task
from adapters.merge import delta_weight, stacked_factors
from serving.engine.weights import TargetDelta, WeightBank

Mode = Literal["dense", "factors"]
F32 = 4


@dataclass
class PreparedAdapter:
    """One loaded adapter: its metadata, per-target pre-merged deltas and its head (float32)."""

    name: str
    metadata: BundleMetadata
    mode: Mode
    deltas: dict[str, TargetDelta]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    #: target -> TargetDelta(b, a) for the unmerged path; the same objects as `deltas` in factors mode
    factors: dict[str, TargetDelta] = field(default_factory=dict)
    #: leases held (AdapterResidency.lease: requests and streams in progress); never evicted while > 0
    inflight: int = 0
    #: unload asked while leased: dropped when the last lease ends (AdapterResidency.unload)
    retiring: bool = False

    @property
    def task(self) -> Task:
        return self.metadata.task

    # Sizes are fixed once prepared (deltas, factors and head are never replaced), and the
    # engine reads them per batch for its stats: computed once.
    @cached_property
    def nbytes(self) -> int:
        extra = sum(d.nbytes for d in self.factors.values()) if self.mode == "dense" else 0
        return sum(d.nbytes for d in self.deltas.values()) + extra + sum(t.numel() * t.element_size() for t in self.head.values())

    @cached_property
    def dense_nbytes(self) -> int:
        return sum(d.nbytes for d in self.deltas.values()) if self.mode == "dense" else 0


def planned_bytes(bundle: AdapterBundle) -> tuple[int, int, int]:
    """(dense bytes, factor bytes, head bytes) the adapter would take in float32."""
    d, r = bundle.metadata.num_copies, bundle.metadata.rank
    dense = sum(f.out_features * f.in_features * F32 for f in bundle.targets.values())
    factors = sum((f.out_features + f.in_features) * d * r * F32 for f in bundle.targets.values())
    head = sum(t.numel() * F32 for t in bundle.head.values())
    return dense, factors, head


def smallest_adapter_bytes(linear_shapes: Iterable[tuple[int, int]]) -> int:
    """The least any adapter can take in the cache on a base with these [out, in] linear layers:
    the factor form of rank 1 with one copy on the smallest layer, (out + in) float32s."""
    return min((o + i) * F32 for o, i in linear_shapes)


def count_bound(capacity: int, linear_shapes: Iterable[tuple[int, int]]) -> int:
    """How many adapters a cache of `capacity` bytes could ever hold at once on this base: a
    count bound from this never binds before the byte budget does."""
    return max(1, capacity // smallest_adapter_bytes(linear_shapes))


def prepare(name: str, bundle: AdapterBundle, bank: WeightBank, device: torch.device, mode: Mode) -> PreparedAdapter:
    """Pre-merge every target with `adapters.merge` (the one source of the delta math)."""
    scaling = bundle.metadata.scaling
    deltas: dict[str, TargetDelta] = {}
    factors: dict[str, TargetDelta] = {}
    with torch.no_grad():
        for path in bundle.metadata.targets:
            f = bundle.targets[path]
            f = TargetFactors(*(t.to(device) for t in (f.lora_A, f.lora_B, f.mask_A, f.mask_B)))
            b, a = stacked_factors(f, scaling)
            factors[path] = TargetDelta(b=b, a=a)
            if mode == "dense":
                dense = delta_weight(f, scaling)
                if bank.transposed(path):
                    dense = dense.t()
                deltas[path] = TargetDelta(dense=dense.contiguous())
            else:
                deltas[path] = factors[path]
        head = {k: v.to(device=device, dtype=torch.float32).contiguous() for k, v in bundle.head.items()}
    return PreparedAdapter(
        name=name, metadata=bundle.metadata, mode=mode, deltas=deltas, head=head, factors=factors
    )


class AdapterCache:
    """Name -> PreparedAdapter in LRU order, bounded by `capacity` bytes (never evicting a
    protected entry: the active one, or one leased by a request in progress)."""

    def __init__(self, capacity: int, dense_budget: int) -> None:
        self.capacity = capacity
        self.dense_budget = dense_budget
        self._entries: OrderedDict[str, PreparedAdapter] = OrderedDict()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[PreparedAdapter]:
        return list(self._entries.values())

    def peek(self, name: str) -> PreparedAdapter | None:
        return self._entries.get(name)

    def touch(self, name: str) -> PreparedAdapter | None:
        entry = self._entries.get(name)
        if entry is not None:
            self._entries.move_to_end(name)
        return entry

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    @property
    def dense_nbytes(self) -> int:
        return sum(e.dense_nbytes for e in self._entries.values())

    def choose_mode(self, dense: int, factors: int, head: int, replacing: str, protected: set[str]) -> Mode | None:
        """dense if it fits the remaining dense budget (and the cache after evictions), else
        factors if those fit; None when neither fits even after evicting all it may."""
        old = self._entries.get(replacing)
        dense_used = self.dense_nbytes - (old.dense_nbytes if old else 0)
        fixed = sum(e.nbytes for n, e in self._entries.items() if n != replacing and self._protected(n, e, protected))
        room = self.capacity - fixed
        # a dense adapter also keeps its factors (for the unmerged path): dense + factors + head
        if dense_used + dense <= self.dense_budget and dense + factors + head <= room:
            return "dense"
        if factors + head <= room:
            return "factors"
        return None

    @staticmethod
    def _protected(name: str, entry: PreparedAdapter, protected: set[str]) -> bool:
        return entry.inflight > 0 or name in protected

    def victims(self, needed: int, replacing: str, protected: set[str]) -> list[str] | None:
        """LRU-first names to evict so that `needed` more bytes fit (after `replacing` goes);
        None when even evicting every unprotected entry would not make room."""
        used = self.nbytes - (self._entries[replacing].nbytes if replacing in self._entries else 0)
        out: list[str] = []
        for n, e in self._entries.items():
            if used + needed <= self.capacity:
                break
            if n == replacing or self._protected(n, e, protected):
                continue
            out.append(n)
            used -= e.nbytes
        return out if used + needed <= self.capacity else None

    def put(self, entry: PreparedAdapter) -> PreparedAdapter | None:
        """Insert (most recently used); returns the entry it replaced, if any."""
        old = self._entries.pop(entry.name, None)
        self._entries[entry.name] = entry
        return old

    def pop(self, name: str) -> PreparedAdapter | None:
        return self._entries.pop(name, None)

    def names(self) -> Iterable[str]:
        return self._entries.keys()
