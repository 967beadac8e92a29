"""The storage interface every registry backend implements (local folder, S3-compatible).

Layout, identical on both backends (keys relative to the root / prefix):

    blobs/<sha256>                      bundle bytes, content-addressed, write-once
    manifests/<name>/<version>.json     AdapterManifest, write-once

A version becomes visible only when its manifest is committed, after its blob is
complete, so a crash mid-upload leaves at most an unreferenced blob or temp file,
never a visible half-written version.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from adapters.bundle import BundleMetadata
from adapters.manifest import AdapterManifest


class AdapterNotFound(KeyError):
    """No such adapter name or version (HTTP 404)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else "adapter not found"


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

    @abstractmethod
    def versions(self, name: str) -> list[AdapterManifest]:
        """Every version of `name`, oldest first; empty if the name is unknown."""

    @abstractmethod
    def list_latest(self) -> list[AdapterManifest]:
        """The latest version of every name, sorted by name."""

    @abstractmethod
    def read_blob(self, sha256: str) -> bytes:
        """The bundle bytes with this digest; AdapterNotFound if absent."""

    @abstractmethod
    def delete(self, name: str, version: int | None = None) -> list[AdapterManifest]:
        """Delete one version or, with version None, all; returns what was deleted.

        AdapterNotFound if nothing matched. Blobs no longer referenced are removed.
        """


def open_store(location: str, *, endpoint_url: str | None = None) -> RegistryStore:
    """A store for a folder path or an `s3://bucket/prefix` URL."""
    if location.startswith("s3://"):
        from adapters.registry.s3 import S3Store

        return S3Store.from_url(location, endpoint_url=endpoint_url)
    from adapters.registry.local import LocalStore

    return LocalStore(Path(location).expanduser())
