"""The registry's record of one stored adapter version (docs/registry.md#manifest)."""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from adapters.bundle import Task

#: A tenant: lower-case ASCII letters, digits and dashes, up to 63 characters.
TENANT_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
#: An adapter name: shared (`name`) or a tenant's own (`tenant/name`); never more than one slash.
NAME_PATTERN = r"^(?:[a-z0-9][a-z0-9-]{0,62}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)
_TENANT_RE = re.compile(TENANT_PATTERN)
#: What stands for the slash of a tenant's name in storage paths and keys: not a name character,
#: so a stored entry maps back to exactly one name and every name stays one path part.
STORAGE_SLASH = "~"


def is_valid_name(name: str) -> bool:
    """Adapter names are ASCII: `name` (1-128 chars) or `tenant/name`, one slash at most."""
    return name.isascii() and bool(_NAME_RE.fullmatch(name))


def is_valid_tenant(tenant: str) -> bool:
    return tenant.isascii() and bool(_TENANT_RE.fullmatch(tenant))


def tenant_of(name: str) -> str | None:
    """The tenant owning `name`, or None for a shared name."""
    tenant, sep, _ = name.partition("/")
    return tenant if sep else None


def storage_name(name: str) -> str:
    """`name` as one path part / key part of the registry layout (`tenant/x` -> `tenant~x`)."""
    return name.replace("/", STORAGE_SLASH)


def name_from_storage(part: str) -> str:
    """The inverse of `storage_name`."""
    return part.replace(STORAGE_SLASH, "/", 1)


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
