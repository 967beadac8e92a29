"""How a bundle stores its masks (docs/bundle-format.md#mask-encodings), and the one place
that turns each encoding into bool masks and back.

- `dense`: bool tensors [d, r, in] / [d, out, r] (the default, when `mask_encoding` is absent);
- `packed`: the same masks, 1 bit an element: uint8 [ceil(n / 8)], row-major, first element
  in the most significant bit (numpy.packbits' order), pad bits 0;
- `seed`: no mask tensors; `mask_seed`, the target path, the matrix and `density` define
  them through a counter-based generator (SHA-256 key, splitmix64 of key + index), so a
  bundle costs what one LoRA costs.

The generator is vectorised in numpy uint64 (wrapping arithmetic is the mod 2^64 the
format fixes), so a MiniLM adapter's masks take milliseconds. The interface is small on
purpose: `target_masks` materialises one target's bool masks from what a file holds,
`packed_target_masks` yields one target's packed bits (what a compact cache keeps), and
`encode_target_masks` produces the tensors a bundle stores.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal, Protocol

import numpy as np
import torch

from adapters.errors import BundleError


class MaskedTarget(Protocol):
    """What `packed_target_masks` reads of a target (adapters.bundle.TargetFactors, which imports this module)."""

    mask_A: torch.Tensor
    mask_B: torch.Tensor


MaskEncoding = Literal["dense", "packed", "seed"]
ENCODINGS: tuple[MaskEncoding, ...] = ("dense", "packed", "seed")
Matrix = Literal["A", "B"]

#: mask_seed is a decimal integer in [0, 2^64)
SEED_LIMIT = 1 << 64
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def mask_shape(matrix: Matrix, d: int, r: int, in_features: int, out_features: int) -> tuple[int, int, int]:
    """The bool shape of a mask: [d, r, in] for A, [d, out, r] for B."""
    return (d, r, in_features) if matrix == "A" else (d, out_features, r)


def packed_size(shape: tuple[int, ...]) -> int:
    """Bytes of a packed mask of this bool shape: ceil(n / 8)."""
    return (int(np.prod(shape, dtype=np.int64)) + 7) // 8


def seed_key(mask_seed: int, target: str, matrix: Matrix) -> int:
    """The generator's 64-bit key: the first 8 bytes of SHA-256("{seed}/{target}/{matrix}"), little-endian."""
    digest = hashlib.sha256(f"{mask_seed}/{target}/{matrix}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def density_threshold(density: float) -> int:
    """floor(density * 2^53): an element is kept iff its 53 high bits fall below this."""
    return int(np.floor(density * float(1 << 53)))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function on a uint64 array, all arithmetic mod 2^64."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def seed_mask(mask_seed: int, target: str, matrix: Matrix, shape: tuple[int, ...], density: float) -> torch.Tensor:
    """The bool mask of `shape` that `mask_seed` defines for (target, matrix) at `density`."""
    n = int(np.prod(shape, dtype=np.int64))
    with np.errstate(over="ignore"):
        counters = np.uint64(seed_key(mask_seed, target, matrix)) + np.arange(n, dtype=np.uint64)
    kept = (splitmix64(counters) >> np.uint64(11)) < np.uint64(density_threshold(density))
    return torch.from_numpy(kept.reshape(shape))


def pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 [ceil(n / 8)]: row-major, first element in the high bit, pad bits 0."""
    flat = mask.detach().cpu().reshape(-1).numpy().astype(np.bool_, copy=False)
    return torch.from_numpy(np.packbits(flat))


def unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool mask of `shape` that `packed` holds (sizes already checked by validation)."""
    n = int(np.prod(shape, dtype=np.int64))
    bits = np.unpackbits(packed.detach().cpu().numpy(), count=n)
    return torch.from_numpy(bits.astype(np.bool_).reshape(shape))


def unpack_many(packed: Sequence[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Several packed masks of one `shape` as one bool tensor [len(packed), *shape] (a batched build)."""
    n = int(np.prod(shape, dtype=np.int64))
    bits = np.stack([np.unpackbits(p.detach().cpu().numpy(), count=n) for p in packed])
    return torch.from_numpy(bits.astype(np.bool_).reshape(len(packed), *shape))


def pad_bits_clear(packed: torch.Tensor, n: int) -> bool:
    """Whether the unused low bits of the last byte of a packed n-element mask are 0."""
    spare = (-n) % 8
    if spare == 0 or packed.numel() == 0:
        return True
    return int(packed.reshape(-1)[-1]) & ((1 << spare) - 1) == 0


def target_masks(
    encoding: MaskEncoding,
    target: str,
    shapes: Mapping[Matrix, tuple[int, ...]],
    stored: Mapping[str, torch.Tensor],
    *,
    mask_seed: int | None = None,
    density: float = 1.0,
) -> dict[Matrix, torch.Tensor]:
    """Bool masks {"A": [d, r, in], "B": [d, out, r]} of one target from what its bundle stores
    (`stored`: the file's tensors by full name; unused for `seed`)."""
    out: dict[Matrix, torch.Tensor] = {}
    for m, shape in shapes.items():
        if encoding == "seed":
            assert mask_seed is not None
            out[m] = seed_mask(mask_seed, target, m, shape, density)
        elif encoding == "packed":
            out[m] = unpack(stored[f"{target}.mask_{m}"], shape)
        else:
            out[m] = stored[f"{target}.mask_{m}"].to(torch.bool)
    return out


def encode_target_masks(encoding: MaskEncoding, target: str, masks: Mapping[Matrix, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mask tensors a bundle of `encoding` stores for one target, by full name ({} for seed)."""
    if encoding == "seed":
        return {}
    return {f"{target}.mask_{m}": pack(t) if encoding == "packed" else t.to(torch.bool) for m, t in masks.items()}


def packed_target_masks(targets: Mapping[str, MaskedTarget]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(target, packed mask_A, packed mask_B) of every target (a bundle's `targets`): the 1-bit form a compact cache keeps."""
    for name, f in targets.items():
        yield name, pack(f.mask_A), pack(f.mask_B)


def seed_mismatches(
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]], mask_seed: int, density: float
) -> list[str]:
    """Targets (name -> (mask_A, mask_B)) whose masks are not the generator's for this seed and density."""
    bad: list[str] = []
    for name, (a, b) in targets.items():
        for m, mask in (("A", a), ("B", b)):
            if not torch.equal(mask.cpu().to(torch.bool), seed_mask(mask_seed, name, m, tuple(mask.shape), density)):
                bad.append(f"{name}.mask_{m}")
    return bad


def check_seed_masks(targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]], mask_seed: int, density: float) -> None:
    """BundleError unless every mask is the generator's: a seed bundle cannot store anything else."""
    bad = seed_mismatches(targets, mask_seed, density)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise BundleError(
            f"mask_encoding seed needs the masks that mask_seed {mask_seed} and density {density:g} generate; "
            f"{shown} differ (store them as packed or dense)"
        )


def mask_bytes(encoding: MaskEncoding, shapes: list[tuple[int, ...]]) -> int:
    """Bytes the masks of these bool shapes take in a bundle of `encoding`."""
    if encoding == "seed":
        return 0
    if encoding == "packed":
        return sum(packed_size(s) for s in shapes)
    return sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
