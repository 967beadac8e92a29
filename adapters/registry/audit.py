"""The audit trail: one JSON line per registry write and key change, kept in the registry store.

Each entry is its own write-once record `audit/<UTC time>-<random>.json` (an S3 bucket has
no append), so concurrent writers on every replica never lose each other's lines; reading
lists them in time order. `capaserve audit` prints them as JSON lines.
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, Field

from adapters.registry.store import RegistryStore

AUDIT = "audit"
log = logging.getLogger(__name__)

Action = Literal["adapter.upload", "adapter.delete", "key.create", "key.revoke"]


class AuditEntry(BaseModel):
    """Who (key id and tenant) did what (action on name/version/sha256, or on a key) when."""

    time: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    key_id: str = Field(..., description="The acting key's id; 'admin-token', 'api-key' or 'anonymous' otherwise.")
    tenant: str | None = Field(None, description="The acting key's tenant.")
    action: Action
    name: str | None = Field(None, description="The adapter name, or the id of the key created or revoked.")
    version: int | None = None
    sha256: str | None = None


def append(store: RegistryStore, entry: AuditEntry) -> None:
    """Store one entry. The change it records has happened, so a failure is logged, not raised."""
    stamp = entry.time.strftime("%Y%m%dT%H%M%S.%fZ")
    try:
        store.put_record(AUDIT, f"{stamp}-{secrets.token_hex(4)}.json", entry.model_dump_json().encode())
    except Exception:  # noqa: BLE001 - see the docstring
        log.error("could not write the audit entry %s", entry.model_dump_json(), exc_info=True)


def read(store: RegistryStore) -> list[AuditEntry]:
    """Every entry, oldest first."""
    out: list[AuditEntry] = []
    for name in store.list_records(AUDIT):
        raw = store.read_record(AUDIT, name)
        if raw is not None:
            out.append(AuditEntry.model_validate_json(raw))
    return out
