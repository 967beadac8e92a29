"""API keys with a tenant and a role, stored hashed in the registry store (docs/http-api.md#keys).

A key is `csk_<id>_<secret>`: `id` (12 hex digits) names the key in lists, audit lines and
revocation; the secret is 32 random bytes. The store keeps `keys/<id>.json` with the sha256 of
the whole key, never the key, so a copy of the registry hands out no credentials. Every
ingress replica (and `capaserve keys`, before any server runs) reads the same folder; a
replica re-lists it at most every `ttl_s` seconds (0.5 s), so a revoked key is refused
everywhere within a second. A listing costs one LIST; records are write-once, so only new ids
are read.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from datetime import datetime, timezone
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters.manifest import TENANT_PATTERN, is_valid_tenant
from adapters.registry.store import RegistryStore

KEYS = "keys"
KEY_PREFIX = "csk_"


class Role(str, Enum):
    """What a key may do; each role may do everything the one before it may."""

    reader = "reader"
    writer = "writer"
    admin = "admin"

    def at_least(self, other: "Role") -> bool:
        order = [Role.reader, Role.writer, Role.admin]
        return order.index(self) >= order.index(other)


class KeyInfo(BaseModel):
    """A key as GET /v1/keys lists it: never the key itself."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(..., pattern=r"^[0-9a-f]{12}$", description="The key's id (also inside the key).")
    tenant: str | None = Field(..., description="The tenant whose adapters the key reaches; None: shared names only.")
    role: Role
    name: str | None = Field(None, max_length=200, description="A label for people.")
    created_at: datetime

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str | None) -> str | None:
        if v is not None and not is_valid_tenant(v):
            raise ValueError(f"tenant must match {TENANT_PATTERN}")
        return v


class KeyRecord(KeyInfo):
    """What the store keeps: the info and the sha256 of the key."""

    key_sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")

    def info(self) -> KeyInfo:
        return KeyInfo(**self.model_dump(exclude={"key_sha256"}))


class CreatedKey(KeyInfo):
    """POST /v1/keys: the only answer that shows `key`."""

    key: str


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Create, list, revoke and look up keys in a registry store, with a short read cache."""

    def __init__(self, store: RegistryStore, ttl_s: float = 0.5) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._records: dict[str, KeyRecord] = {}
        self._listed_at = float("-inf")

    def create(self, tenant: str | None, role: Role, name: str | None = None) -> CreatedKey:
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        rec = KeyRecord(id=key_id, tenant=tenant, role=role, name=name, created_at=datetime.now(timezone.utc),
                        key_sha256=key_digest(key))
        self.store.put_record(KEYS, f"{key_id}.json", rec.model_dump_json().encode())
        self._listed_at = float("-inf")
        return CreatedKey(**rec.info().model_dump(), key=key)

    def list(self) -> list[KeyRecord]:
        """Every live key, oldest first, read now (no cache)."""
        self._refresh(force=True)
        return sorted(self._records.values(), key=lambda r: (r.created_at, r.id))

    def get(self, key_id: str) -> KeyRecord | None:
        self._refresh(force=True)
        return self._records.get(key_id)

    def revoke(self, key_id: str) -> KeyRecord | None:
        """Delete the key's record; the record it had, or None if there was none."""
        rec = self.get(key_id)
        if rec is None or not self.store.delete_record(KEYS, f"{key_id}.json"):
            return None
        self._listed_at = float("-inf")
        return rec

    def fresh(self) -> bool:
        """Whether the cached listing is younger than `ttl_s` (a lookup now reads no store)."""
        return time.monotonic() - self._listed_at < self.ttl_s

    def lookup(self, key: str, refresh: bool = True) -> KeyRecord | None:
        """The live record of `key`, or None. The digest is compared in constant time with the
        record its id names, so neither timing nor a guessed id tells anything of the secret.
        refresh=False answers from the cached listing, however old."""
        if refresh:
            self._refresh()
        key_id = key[len(KEY_PREFIX):len(KEY_PREFIX) + 12] if key.startswith(KEY_PREFIX) else ""
        rec = self._records.get(key_id)
        expected = rec.key_sha256 if rec is not None else "0" * 64
        if hmac.compare_digest(key_digest(key), expected) and rec is not None:
            return rec
        return None

    def any(self, refresh: bool = True) -> bool:
        """Whether any key exists (then every request needs one)."""
        if refresh:
            self._refresh()
        return bool(self._records)

    def _refresh(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._listed_at < self.ttl_s:
                return
            names = {n for n in self.store.list_records(KEYS) if n.endswith(".json")}
            records: dict[str, KeyRecord] = {}
            for n in names:
                key_id = n[: -len(".json")]
                rec = self._records.get(key_id)
                if rec is None:
                    raw = self.store.read_record(KEYS, n)
                    if raw is None:
                        continue  # revoked while listing
                    rec = KeyRecord.model_validate_json(raw)
                records[key_id] = rec
            self._records = records
            self._listed_at = now
