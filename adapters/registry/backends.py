"""Choosing a registry backend from a location string (the `--registry` setting)."""

from __future__ import annotations

from pathlib import Path

from adapters.registry.local import LocalStore
from adapters.registry.s3 import S3Store
from adapters.registry.store import RegistryStore


def open_store(location: str, *, endpoint_url: str | None = None) -> RegistryStore:
    """A store for a folder path or an `s3://bucket/prefix` URL."""
    if location.startswith("s3://"):
        return S3Store.from_url(location, endpoint_url=endpoint_url)
    return LocalStore(Path(location).expanduser())
