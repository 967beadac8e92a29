"""Linear layers that run on weights prepacked for the CPU's bfloat16 matmul (oneDNN).

Why: on a CPU, torch's bfloat16 `linear` reorders the weight into oneDNN's blocked layout on
every call. For MiniLM's 384x1536 layers that reorder is ~60 us of a 90 us call at one text,
and a prepacked weight is still ~18% faster at 1,280 rows (one thread, this 2-core AVX512-BF16
host); the outputs are the same kernel's, bit for bit (tests/test_packed_weights.py). Measured:
a one-text MiniLM forward on one thread -20%, tiny-Llama continuous batching +22% tokens/s; two
MiniLM engine workers sharing the 2 cores gain nothing measurable.

How it stays exact under hot swaps: a packed module keeps its ordinary `weight` parameter (the
one the `WeightBank` writes in place, so pristine copies, swaps and the state dict are
unchanged) and packs a copy of it. Every in-place write bumps the tensor's version counter, so
the first forward after a swap sees a new version and packs again (~0.1 ms per target); a
forward never runs on a stale copy. Forward hooks (the unmerged adapters' additions) still run.

The cost is a second copy of every linear weight (21 MB for MiniLM in bfloat16), so
`pack_weights="auto"` packs on a CPU in bfloat16 when the copies fit `PACK_MAX_FRACTION` of the
memory available; "off" never packs. On a GPU or in float32 (where torch's own call is as fast,
measured) nothing changes.
"""

from __future__ import annotations

import logging

import psutil
import torch

log = logging.getLogger("capaserve.packed")

#: At most this fraction of the available memory goes to packed copies under "auto".
PACK_MAX_FRACTION = 0.25


def packing_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed weights pay here: a CPU computing bfloat16 through oneDNN."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return bool(mkldnn._is_mkldnn_bf16_supported()) and hasattr(mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(torch.nn.Linear):
    """An `nn.Linear` whose forward uses a packed copy of `weight`, repacked whenever it changed."""

    _packed: tuple[tuple[tuple[int, int], ...], torch.Tensor] | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed_for(x)
        if packed is None:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def packs(self, x: torch.Tensor) -> bool:
        """Whether a forward on `x` runs on the packed copy (else torch's own linear)."""
        w = self.weight
        return x.dtype == w.dtype and x.device.type == "cpu" and not (torch.is_grad_enabled() and w.requires_grad)

    def packed_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The packed copy of the current weight, or None where `x` needs torch's own linear."""
        if not self.packs(x):
            return None
        w = self.weight
        key = written_state(w)
        packed = self._packed
        if packed is None or packed[0] != key:
            with torch.no_grad():
                packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1))
            self._packed = packed  # one assignment: a concurrent forward sees the old pair or the new
        return packed[1]


def fused_linear(
    mod: torch.nn.Module, x: torch.Tensor, *, act: torch.nn.Module | None = None, add: torch.Tensor | None = None
) -> torch.Tensor:
    """`act(mod(x))` or `mod(x) + add`; on a packed layer the GELU (erf) or the add runs as a
    oneDNN post-op of the matmul, in float32 before the one rounding to the output dtype.
    A layer with forward hooks (an unmerged adapter's per-row update) runs them, unfused."""
    packed = mod.packed_for(x) if type(mod) is PackedLinear and not _hooked(mod) else None
    if packed is not None and add is not None and act is None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, packed, mod.bias, "add")
    if packed is not None and add is None and (act is None or _is_erf_gelu(act)):
        return torch.ops.mkldnn._linear_pointwise(x, packed, mod.bias, "none" if act is None else "gelu", [],
                                                  "" if act is None else "none")
    y = mod(x)
    if act is not None:
        y = act(y)
    return y if add is None else y + add


def fused_projections(mods: tuple[torch.nn.Linear, ...], x: torch.Tensor) -> torch.Tensor:
    """`torch.cat([m(x) for m in mods], -1)`; on packed layers (an attention layer's query, key
    and value) one matmul on their concatenated weights: one pass over `x` and one wide matmul
    instead of three narrow ones. Each output column is the dot product its own layer computes,
    bit for bit on the packed bfloat16 kernel (tests/test_unpadded.py).

    Exact under hot swaps as `PackedLinear` is: the packed concatenation is cached on the first
    module, keyed by every weight's and bias's version and address, and rebuilt on the first
    forward after any of them was written. It stands in for the layers' own packed copies on
    this path (those are made only where the layers run alone: mixed-adapter forwards), so the
    memory is the same. Unpacked layers (float32, a GPU) run as they are: a concatenated copy
    there would be memory on top; so do layers with forward hooks, which run."""
    if not all(type(m) is PackedLinear and m.packs(x) and not _hooked(m) for m in mods):
        return torch.cat([m(x) for m in mods], -1)
    key = written_state(*(p for m in mods for p in (m.weight, m.bias) if p is not None))
    cached = getattr(mods[0], "_fused", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            weight = torch.ops.mkldnn._reorder_linear_weight(torch.cat([m.weight.detach() for m in mods]), 1)
            bias = None
            if any(m.bias is not None for m in mods):
                bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                                  for m in mods])
        cached = (key, weight, bias)
        mods[0]._fused = cached  # one assignment: a concurrent forward sees the old triple or the new
    _, weight, bias = cached
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def written_state(*tensors: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """What a packed copy is keyed by: each tensor's version and address. Every in-place write
    (a hot swap) bumps the version, so a copy whose key differs is stale."""
    return tuple((t._version, t.data_ptr()) for t in tensors)


def _hooked(mod: torch.nn.Module) -> bool:
    """Whether `mod` has forward hooks, which only its own call runs."""
    return bool(mod._forward_hooks or mod._forward_pre_hooks)


def _is_erf_gelu(act: torch.nn.Module) -> bool:
    """transformers' "gelu" (GELUActivation on torch's exact, erf-based GELU)."""
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is torch.nn.functional.gelu


def pack_linears(model: torch.nn.Module) -> int:
    """Turn every `nn.Linear` of `model` on the CPU into a `PackedLinear` in place; how many.
    Packing itself happens at each one's first forward (and again after each write)."""
    n = 0
    for mod in model.modules():
        if type(mod) is torch.nn.Linear and mod.weight.device.type == "cpu":
            mod.__class__ = PackedLinear
            mod._packed = None
            n += 1
    return n


def unpack_linears(model: torch.nn.Module) -> None:
    """Back to plain `nn.Linear` (tests compare the two on the same tensors)."""
    for mod in model.modules():
        if type(mod) is PackedLinear:
            mod.__class__ = torch.nn.Linear
            del mod._packed


def linear_bytes(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is torch.nn.Linear)


def maybe_pack(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, setting: str) -> int:
    """Apply the `pack_weights` setting ("auto" or "off"); the number of packed layers."""
    if setting == "off" or not packing_applies(device, dtype):
        return 0
    size = linear_bytes(model)
    if size > PACK_MAX_FRACTION * psutil.virtual_memory().available:
        log.warning("not packing weights: their copies (%d MiB) exceed %.0f%% of the available memory",
                    size >> 20, 100 * PACK_MAX_FRACTION)
        return 0
    n = pack_linears(model)
    log.info("packed %d linear layers for oneDNN bfloat16 (%d MiB of copies)", n, size >> 20)
    return n
