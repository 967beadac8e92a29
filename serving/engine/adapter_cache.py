"""Adapters as their bundles hold them, the forms a swap needs built on activation, and
the LRU that bounds both in bytes.

Each loaded adapter is held compact: per target its shared factors (A [r, in], B [out, r],
in the bundle's dtype) and its d masks as bits (numpy.packbits order, MSB first), plus its
head in float32. That is what the byte budget counts for a resident adapter; a bool mask
would take 8 times the bits.

When an adapter is activated (merged for a forward, or hooked in for a mixed one) its
built form is made from that, with `adapters.merge` (the one source of the delta math):
- factors: the exact stacked pair (B', A') of rank d*r in float32; a swap is one addmm,
  and the mixed path hooks exactly this pair;
- dense (`mode == "dense"`): also the float32 delta in the weight's own orientation; a
  swap is one fused add.
Built forms are kept while the byte budget has room (their dense deltas within
`dense_budget_bytes`); their bytes count in the budget as well, and they are the first
thing dropped (least recently built first) when room is needed: rebuilding one takes about
half a millisecond, reloading an evicted adapter a registry read. Building is
deterministic, so an adapter activated again writes bit-identical weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch

from adapters.bundle import AdapterBundle, BundleMetadata, TargetFactors, Task
from adapters.masks import pack, unpack_many
from serving.engine.weights import TargetDelta, WeightBank

Mode = Literal["dense", "factors"]
F32 = 4


@dataclass(frozen=True)
class CompactTarget:
    """One target as its bundle holds it: factors on the device, masks as packed bits."""

    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    mask_A: torch.Tensor  # uint8 bits of the [d, r, in] mask
    mask_B: torch.Tensor  # uint8 bits of the [d, out, r] mask
    copies: int
    transposed: bool  # the weight is stored [in, out] (GPT-2's Conv1D)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.lora_A, self.lora_B, self.mask_A, self.mask_B))


def compact_target(f: TargetFactors, device: torch.device = torch.device("cpu"), transposed: bool = False) -> CompactTarget:
    mask_A, mask_B = pack(f.mask_A), pack(f.mask_B)
    return CompactTarget(
        lora_A=f.lora_A.to(device).contiguous(), lora_B=f.lora_B.to(device).contiguous(),
        mask_A=mask_A, mask_B=mask_B, copies=f.mask_A.shape[0], transposed=transposed,
    )


def build_pairs(compact: Mapping[str, CompactTarget], scaling: float) -> dict[str, TargetDelta]:
    """Every target's stacked float32 pair (B' [out, d*r], A' [d*r, in]), the targets of one
    shape built together: `adapters.merge.stacked_factors`' element-wise math on the unpacked
    masks, in a few batched ops per shape instead of a dozen per target, so the values are
    the same bit for bit. Why: under uniform churn over 2,000 MiniLM adapters nearly every
    request builds one, and the per-target ops were ~11% of the replica's CPU. Each pair is a
    view of its group's tensors (freed together with the built form)."""
    groups: dict[tuple, list[str]] = {}
    for t, c in compact.items():
        key = (tuple(c.lora_A.shape), tuple(c.lora_B.shape), c.copies, c.lora_A.dtype, c.lora_B.dtype)
        groups.setdefault(key, []).append(t)
    out: dict[str, TargetDelta] = {}
    for ((r, n_in), (n_out, _), d, _, _), names in groups.items():
        cs = [compact[t] for t in names]
        device = cs[0].lora_A.device
        ma = unpack_many([c.mask_A for c in cs], (d, r, n_in)).to(device)
        mb = unpack_many([c.mask_B for c in cs], (d, n_out, r)).to(device)
        A = torch.stack([c.lora_A for c in cs]).to(torch.float32)  # [T, r, in]
        B = torch.stack([c.lora_B for c in cs]).to(torch.float32)  # [T, out, r]
        # [T, d, r, in] -> [T, d*r, in]; [T, d, out, r] -> [T, out, d, r] -> [T, out, d*r]
        a_stack = (A.unsqueeze(1) * ma.to(torch.float32)).reshape(len(cs), d * r, n_in)
        b_stack = (B.unsqueeze(1) * mb.to(torch.float32)).permute(0, 2, 1, 3).reshape(len(cs), n_out, d * r) * scaling
        for i, t in enumerate(names):
            out[t] = TargetDelta(b=b_stack[i], a=a_stack[i])
    return out


def dense_of(pair: TargetDelta, transposed: bool) -> TargetDelta:
    """The dense delta B'A' of a stacked pair, in the weight's orientation."""
    assert pair.b is not None and pair.a is not None
    delta = pair.b @ pair.a
    return TargetDelta(dense=(delta.t() if transposed else delta).contiguous())


@dataclass
class Built:
    """An activated adapter's built form: the factor pairs (mixed path, factors-mode swaps),
    and for a dense adapter once it is merged, its dense deltas."""

    factors: dict[str, TargetDelta]
    dense: dict[str, TargetDelta] | None = None
    # Byte counts, summed once per dict: the cache asks for them at every activation (the
    # sums over every target of every kept form were ~8% of a replica's CPU with 2,000 adapters).
    _factor_bytes: int = field(init=False, default=0, repr=False)
    _dense_bytes: int = field(init=False, default=0, repr=False)

    def __post_init__(self) -> None:
        self._factor_bytes = sum(d.nbytes for d in self.factors.values())

    @property
    def deltas(self) -> dict[str, TargetDelta]:
        """What a swap writes: the dense deltas when built, else the pairs."""
        return self.dense if self.dense is not None else self.factors

    @property
    def nbytes(self) -> int:
        return self._factor_bytes + self.dense_nbytes

    @property
    def dense_nbytes(self) -> int:
        return self._dense_bytes if self.dense is not None else 0

    def set_dense(self, dense: dict[str, TargetDelta]) -> None:
        """Attach the dense deltas (the one way they are set, so their byte count stays right)."""
        self.dense = dense
        self._dense_bytes = sum(d.nbytes for d in dense.values())


@dataclass
class PreparedAdapter:
    """One loaded adapter: its metadata, its targets held compact, its head (float32), and
    its built form while it is one of the recently activated."""

    name: str
    metadata: BundleMetadata
    mode: Mode
    compact: dict[str, CompactTarget]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    built: Built | None = None
    #: leases held (AdapterResidency.lease: requests and streams in progress); never evicted while > 0
    inflight: int = 0
    #: unload asked while leased: dropped when the last lease ends (AdapterResidency.unload)
    retiring: bool = False

    @property
    def task(self) -> Task:
        return self.metadata.task

    @property
    def targets(self) -> list[str]:
        return list(self.compact)

    @cached_property
    def held_nbytes(self) -> int:
        """Bytes of the compact form and the head: fixed once prepared."""
        return sum(c.nbytes for c in self.compact.values()) + sum(t.numel() * t.element_size() for t in self.head.values())

    @property
    def nbytes(self) -> int:
        return self.held_nbytes + (self.built.nbytes if self.built is not None else 0)

    @property
    def dense_nbytes(self) -> int:
        return self.built.dense_nbytes if self.built is not None else 0

    def is_built(self, merged: bool = False) -> bool:
        """Whether `build(merged)` would make nothing new (so no budget can have grown)."""
        return self.built is not None and not (merged and self.mode == "dense" and self.built.dense is None)

    def build(self, merged: bool = False) -> Built:
        """The built form (made now unless it is kept): the factor pairs, plus for a dense
        adapter about to be `merged` its dense deltas (a mixed forward needs only the pairs)."""
        if self.built is None:
            scaling = self.metadata.scaling
            self.built = Built(factors=build_pairs(self.compact, scaling))
        if merged and self.mode == "dense" and self.built.dense is None:
            self.built.set_dense({t: dense_of(self.built.factors[t], c.transposed) for t, c in self.compact.items()})
        return self.built


def planned_bytes(bundle: AdapterBundle) -> tuple[int, int, int]:
    """(dense bytes, factor bytes, head bytes) the adapter's built form would take in float32."""
    d, r = bundle.metadata.num_copies, bundle.metadata.rank
    dense = sum(f.out_features * f.in_features * F32 for f in bundle.targets.values())
    factors = sum((f.out_features + f.in_features) * d * r * F32 for f in bundle.targets.values())
    head = sum(t.numel() * F32 for t in bundle.head.values())
    return dense, factors, head


def held_bytes(bundle: AdapterBundle) -> int:
    """Bytes the adapter takes held compact: its factors in their dtype, its masks as bits, its head in float32."""
    total = sum(t.numel() * F32 for t in bundle.head.values())
    for f in bundle.targets.values():
        total += f.lora_A.numel() * f.lora_A.element_size() + f.lora_B.numel() * f.lora_B.element_size()
        total += -(-f.mask_A.numel() // 8) + -(-f.mask_B.numel() // 8)
    return total


def smallest_adapter_bytes(linear_shapes: Iterable[tuple[int, int]]) -> int:
    """The least any adapter can take in the cache on a base with these [out, in] linear layers:
    rank 1 with one copy on the smallest layer, held compact: (out + in) float16 factors and
    (out + in) mask bits."""
    return min((o + i) * 2 + -(-o // 8) + -(-i // 8) for o, i in linear_shapes)


def count_bound(capacity: int, linear_shapes: Iterable[tuple[int, int]]) -> int:
    """How many adapters a cache of `capacity` bytes could ever hold at once on this base: a
    count bound from this never binds before the byte budget does."""
    return max(1, capacity // smallest_adapter_bytes(linear_shapes))


def prepare(name: str, bundle: AdapterBundle, bank: WeightBank, device: torch.device, mode: Mode) -> PreparedAdapter:
    """The compact entry for `bundle` (nothing built yet), its head in float32 on the device."""
    with torch.no_grad():
        compact = {
            path: compact_target(bundle.targets[path], device, bank.transposed(path)) for path in bundle.metadata.targets
        }
        head = {k: v.to(device=device, dtype=torch.float32).contiguous() for k, v in bundle.head.items()}
    return PreparedAdapter(name=name, metadata=bundle.metadata, mode=mode, compact=compact, head=head)


class AdapterCache:
    """Name -> PreparedAdapter in LRU order, bounded by `capacity` bytes (never evicting a
    protected entry: the active one, or one leased by a request in progress), and the LRU
    of built forms within the same bytes (their dense deltas within `dense_budget`), which
    give way first. Byte totals are kept as running sums: with thousands of adapters built,
    summing them at every activation would cost more than building."""

    def __init__(self, capacity: int, dense_budget: int) -> None:
        self.capacity = capacity
        self.dense_budget = dense_budget
        self._entries: OrderedDict[str, PreparedAdapter] = OrderedDict()
        self._held = 0  # held_nbytes of every entry
        self._built: OrderedDict[str, PreparedAdapter] = OrderedDict()  # entries with a built form, LRU first
        self._built_bytes = 0  # Built.nbytes of every kept built form
        self._dense_bytes = 0  # of which dense deltas

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
        """What the cache really holds: every compact form and head, plus the built forms kept."""
        return self._held + self._built_bytes

    @property
    def dense_nbytes(self) -> int:
        return self._dense_bytes

    def build(self, entry: PreparedAdapter, merged: bool = False) -> Built:
        """`entry`'s built form (`PreparedAdapter.build`), made now unless kept; then the least
        recently built others are dropped while over the dense budget or the capacity.
        Dropping one is always safe: a swap away restores the pristine weights, and a forward
        in progress holds its own references to the tensors it uses."""
        if self._built.pop(entry.name, None) is not None:
            self._count(entry, -1)  # counted again below, with what this build adds
        built = entry.build(merged)
        self._built[entry.name] = entry
        self._count(entry, +1)
        self.shed_built(0, {entry.name})
        return built

    def shed_built(self, needed: int, protected: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Drop built forms, least recently built first, until `needed` more bytes fit the
        capacity and the dense deltas fit their budget; those of `protected` entries and of
        leased ones (in use: the active adapter, a request's) stay."""
        over = self.nbytes + needed - self.capacity
        dense_over = self._dense_bytes - self.dense_budget
        victims: list[str] = []
        for name, entry in self._built.items():  # only as far as needed: thousands may be kept
            if over <= 0 and dense_over <= 0:
                break
            if not self._protected(name, entry, protected) and entry.built is not None:
                victims.append(name)
                over -= entry.built.nbytes
                dense_over -= entry.built.dense_nbytes
        for name in victims:
            self._drop_built(name)

    def _drop_built(self, name: str) -> None:
        entry = self._built.pop(name)
        self._count(entry, -1)
        entry.built = None

    def _count(self, entry: PreparedAdapter, sign: int) -> None:
        """Add (+1) or take out (-1) `entry`'s built form from the byte sums."""
        if entry.built is not None:
            self._built_bytes += sign * entry.built.nbytes
            self._dense_bytes += sign * entry.built.dense_nbytes

    def touch_built(self, entry: PreparedAdapter) -> Built:
        """`entry`'s kept built form, now the most recently built (`entry.is_built`: nothing is
        made, so no budget grew; a decode step comes here once per adapter of its batch)."""
        assert entry.built is not None
        self._built.move_to_end(entry.name)
        return entry.built

    def built_names(self) -> list[str]:
        """Entries whose built form is kept, least recently built first."""
        return list(self._built)

    def choose_mode(self, dense: int, factors: int, held: int, replacing: str, protected: set[str]) -> Mode | None:
        """The built form `replacing` will take: dense if its dense deltas fit the dense budget
        (other built forms can always be dropped) and, built, it fits the cache beside the
        protected entries; else factors if those fit; None when not even that fits."""
        fixed = sum(e.held_nbytes for n, e in self._entries.items() if n != replacing and self._protected(n, e, protected))
        room = self.capacity - fixed
        # a dense adapter keeps its factors too (for the unmerged path): held + factors + dense
        if dense <= self.dense_budget and held + factors + dense <= room:
            return "dense"
        if held + factors <= room:
            return "factors"
        return None

    @staticmethod
    def _protected(name: str, entry: PreparedAdapter, protected: set[str]) -> bool:
        return entry.inflight > 0 or name in protected

    def victims(self, needed: int, replacing: str | None, protected: set[str]) -> list[str] | None:
        """LRU-first names to evict so that `needed` more bytes fit (after `replacing`, a name
        being loaded again, goes); None when even evicting every unprotected entry would not
        make room."""
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
        old = self.pop(entry.name)
        self._entries[entry.name] = entry
        self._held += entry.held_nbytes
        return old

    def pop(self, name: str) -> PreparedAdapter | None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            self._held -= entry.held_nbytes
            if self._built.get(name) is entry:
                self._drop_built(name)
        return entry

    def names(self) -> Iterable[str]:
        return self._entries.keys()
