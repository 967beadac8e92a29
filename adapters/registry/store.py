"""The storage interface every registry backend implements (local folder, S3-compatible).

Layout, identical on both backends (keys relative to the root / prefix):

    blobs/<sha256>                      bundle bytes, content-addressed, write-once
    manifests/<name>/<version>.json     AdapterManifest, write-once
    manifests/<name>/<version>.deleted  tombstone of a deleted version
    keys/<id>.json                      an API key's record (its sha256, never the key)
    audit/<time>-<id>.json              one audit line (registry write or key change)

A tenant's name `tenant/x` is stored as `tenant~x` (adapters.manifest.storage_name).

A version becomes visible only when its manifest is committed, after its blob is
complete, so a crash mid-upload leaves at most an unreferenced blob or temp file,
never a visible half-written version.

Version numbers are never reused, even after a delete: replicas cache adapters by
`name@version`, so a reused number could serve stale weights under a new upload. The
tombstone keeps the number taken (a live version is a `.json` without a `.deleted`).
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from adapters.bundle import BundleMetadata
from adapters.manifest import AdapterManifest

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
#: Folders and entry names of small records (keys, audit lines): never a path outside them.
RECORD_FOLDERS = ("keys", "audit")
RECORD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_record(folder: str, name: str | None = None) -> None:
    if folder not in RECORD_FOLDERS or (name is not None and not RECORD_NAME_RE.fullmatch(name)):
        raise ValueError(f"invalid record {folder}/{name}")
#: Read/copy granularity for bundle files: large enough for throughput, small enough to bound memory.
CHUNK_BYTES = 1 << 20


class AdapterNotFound(KeyError):
    """No such adapter name or version (HTTP 404)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else "adapter not found"


def not_found(name: str, version: int | None = None) -> AdapterNotFound:
    """The one error for a name (or version) that is not there; every backend raises this text,
    and the API raises it for a name the caller may not see."""
    return AdapterNotFound(f"adapter {name}@{version} not found" if version else f"adapter {name!r} not found")


class RegistryCorrupt(RuntimeError):
    """Stored bytes do not match their recorded sha256 (HTTP 500): storage was tampered with."""


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in chunks so big bundles never sit in memory twice."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def verified_chunks(chunks: Iterator[bytes], sha256: str, size: int, what: str = "stored blob") -> Iterator[bytes]:
    """`chunks` passed through while hashed, the last one held back until the whole matches the
    manifest: a blob that does not raises RegistryCorrupt (naming `what`) instead, so a response
    under way ends short of its Content-Length and no client mistakes it for the adapter."""
    h = hashlib.sha256()
    seen = 0
    held: bytes | None = None
    for chunk in chunks:
        h.update(chunk)
        seen += len(chunk)
        if held is not None:
            yield held
        held = chunk
    if seen != size or h.hexdigest() != sha256:
        raise RegistryCorrupt(f"{what} {sha256} does not match its manifest ({seen} bytes, expected {size})")
    if held is not None:
        yield held


def build_manifest(name: str, version: int, sha256: str, size: int, metadata: BundleMetadata) -> AdapterManifest:
    """The manifest of a new version; one place so both backends record the same fields."""
    return AdapterManifest(
        name=name,
        version=version,
        sha256=sha256,
        size_bytes=size,
        base_model=metadata.base_model,
        task=metadata.task,
        rank=metadata.rank,
        num_copies=metadata.num_copies,
        alpha=metadata.alpha,
        targets=list(metadata.targets),
        created_at=datetime.now(timezone.utc),
    )


class RegistryStore(ABC):
    """Backend-neutral registry operations. Implementations are safe across processes."""

    @abstractmethod
    def commit(self, name: str, bundle_file: Path, metadata: BundleMetadata) -> AdapterManifest:
        """Store an already-validated bundle file as the next version of `name`.

        Concurrent commits of one name get distinct versions. The blob is written (if new)
        before the manifest; the manifest write is atomic and never overwrites.
        """

    @abstractmethod
    def get(self, name: str, version: int | None = None) -> AdapterManifest:
        """The manifest of `name@version`, or of the latest version; AdapterNotFound if none."""

    def versions(self, name: str) -> list[AdapterManifest]:
        """Every version of `name`, oldest first; empty if the name is unknown."""
        out: list[AdapterManifest] = []
        for v in self.version_numbers(name):
            try:
                out.append(self._read_manifest(name, v))
            except AdapterNotFound:
                pass  # deleted while we were reading
        return out

    @abstractmethod
    def list_latest(self) -> list[AdapterManifest]:
        """The latest version of every name, sorted by name."""

    def read_blob(self, sha256: str) -> bytes:
        """The bundle bytes with this digest; AdapterNotFound if it is absent or not a digest."""
        return b"".join(self.stream_blob(sha256))

    def stream_blob(self, sha256: str) -> Iterator[bytes]:
        """The bundle bytes with this digest in chunks of up to CHUNK_BYTES, never whole in memory.

        AdapterNotFound, raised here before the first chunk, if the blob is absent or the digest
        is malformed (a malformed one never reaches the backend: it could name a path or key
        outside blobs/). Closing the iterator early releases the file or connection.
        """
        if not SHA256_RE.fullmatch(sha256):
            raise AdapterNotFound(f"blob {sha256!r} not found")
        chunks = self._open_blob(sha256)
        if chunks is None:
            raise AdapterNotFound(f"blob {sha256} not found")
        return chunks

    @abstractmethod
    def _open_blob(self, sha256: str) -> Iterator[bytes] | None:
        """The blob's bytes in chunks, opened now (None if there is none); `sha256` is well-formed."""

    @abstractmethod
    def delete(self, name: str, version: int | None = None) -> list[AdapterManifest]:
        """Delete one version or, with version None, all; returns what was deleted.

        AdapterNotFound if nothing matched. Blobs no longer referenced are removed.
        """

    def _versions_to_delete(self, name: str, version: int | None) -> list[int]:
        """The live versions a delete of `name` (one version, or all) removes; AdapterNotFound if none."""
        nums = self.version_numbers(name)
        if version is not None:
            if version not in nums:
                raise AdapterNotFound(f"adapter {name}@{version} not found")
            return [version]
        if not nums:
            raise AdapterNotFound(f"adapter {name!r} not found")
        return nums

    # -- small records beside the manifests (keys, audit lines) ---------------------------

    @abstractmethod
    def put_record(self, folder: str, name: str, data: bytes) -> None:
        """Write `folder/name` once, atomically; FileExistsError if it exists."""

    @abstractmethod
    def read_record(self, folder: str, name: str) -> bytes | None:
        """The bytes of `folder/name`, or None if absent."""

    @abstractmethod
    def list_records(self, folder: str) -> list[str]:
        """The entry names in `folder`, sorted, from one listing."""

    @abstractmethod
    def delete_record(self, folder: str, name: str) -> bool:
        """Remove `folder/name`; whether it was there."""

    @abstractmethod
    def probe(self) -> None:
        """Raise unless the store answers now (one cheap listing); readiness asks it."""

    @abstractmethod
    def version_numbers(self, name: str) -> list[int]:
        """The live version numbers of `name`, ascending, from one listing (no manifest reads);
        resolvers call it on every request."""

    @abstractmethod
    def _read_manifest(self, name: str, version: int) -> AdapterManifest:
        """One stored manifest; AdapterNotFound if it is absent or deleted."""
