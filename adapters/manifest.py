"""The registry's record of one stored adapter version (docs/registry.md#manifest)."""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from adapters.bundle import Task

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)


def is_valid_name(name: str) -> bool:
    """Adapter names are ASCII, 1-128 chars, no slashes: safe as path parts and object keys."""
    return bool(_NAME_RE.fullmatch(name)) and name.isascii()


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """'name@3' -> ('name', 3); 'name' -> ('name', None) meaning the latest version.

    Raises ValueError for a malformed version.
    """
    name, sep, version = ref.rpartition("@")
    if not sep:
        return ref, None
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise ValueError(f"version in {ref!r} must be a positive integer")
    return name, int(version)


class AdapterManifest(BaseModel):
    """One immutable adapter version: what the registry lists and replicas resolve."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(..., pattern=NAME_PATTERN, description="Adapter name, unique in the registry.")
    version: int = Field(..., ge=1, description="Version of this name, counting up from 1.")
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="sha256 of the bundle bytes; the blob key.")
    size_bytes: int = Field(..., ge=0, description="Size of the bundle file in bytes.")
    base_model: str = Field(..., description="Base model id the adapter was trained on.")
    task: Task = Field(..., description="feature-extraction, sequence-classification or causal-lm.")
    rank: int = Field(..., ge=1, description="r of the shared LoRA factors.")
    num_copies: int = Field(..., ge=1, description="d, the number of masked copies.")
    alpha: float = Field(..., description="LoRA alpha; scaling is alpha / r.")
    targets: list[str] = Field(..., description="Target module paths.")
    created_at: datetime = Field(..., description="When this version was committed (UTC).")

    @property
    def ref(self) -> str:
        """The pinned model id, `name@version`, used as the multiplexed model id."""
        return f"{self.name}@{self.version}"
