"""Model id -> manifest -> bundle, as a serving replica needs it.

`resolve` reads the store's version listing on every call, so a new version (or a
delete) is seen by the very next request, on every replica, without a restart or a
notification. (For a remote store where a listing costs a round trip, `listing_ttl_s`
lets a replica reuse a listing for that long; `forget(name)` drops it at once.) What
never changes is cached: manifests by (name, version) and bundle
bytes by sha256, the latter in an LRU bounded in bytes. Every fetched blob is checked
against its sha256 before it is cached or parsed, so a corrupted store cannot serve
weights nobody uploaded.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from adapters.bundle import AdapterBundle
from adapters.manifest import AdapterManifest, is_valid_name, parse_model_ref
from adapters.registry.store import AdapterNotFound, RegistryStore, verified_chunks
from adapters.validation import load_bundle

#: Manifests are tiny, but a registry may hold many; bound the cache anyway.
MAX_CACHED_MANIFESTS = 4096


@dataclass
class CacheInfo:
    """Counters of the blob cache, for metrics."""

    hits: int
    misses: int
    blobs: int
    bytes: int
    max_bytes: int


class AdapterResolver:
    """Resolves `name` / `name@version` against a store and fetches verified bundles."""

    def __init__(
        self, store: RegistryStore, blob_cache_bytes: int = 512 * 1024 * 1024, *, listing_ttl_s: float = 0.0
    ) -> None:
        self.store = store
        self.blob_cache_bytes = int(blob_cache_bytes)
        self.listing_ttl_s = float(listing_ttl_s)
        self._listings: dict[str, tuple[float, list[int]]] = {}
        self._lock = threading.Lock()
        self._manifests: OrderedDict[tuple[str, int], AdapterManifest] = OrderedDict()
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._blob_bytes = 0
        self._hits = 0
        self._misses = 0

    def resolve(self, ref: str) -> AdapterManifest:
        """The manifest `ref` names now: `name` is the latest version, `name@3` that one.

        AdapterNotFound if the name is malformed, unknown, or the version is absent/deleted.
        """
        try:
            name, version = parse_model_ref(ref)
        except ValueError as exc:
            raise AdapterNotFound(f"adapter {ref!r} not found: {exc}") from None
        if not is_valid_name(name):
            raise AdapterNotFound(f"adapter {ref!r} not found")
        live = self._version_numbers(name)
        if not live:
            raise AdapterNotFound(f"adapter {name!r} not found")
        if version is None:
            version = live[-1]
        elif version not in live:
            raise AdapterNotFound(f"adapter {name}@{version} not found (versions: {live})")
        key = (name, version)
        with self._lock:
            cached = self._manifests.get(key)
            if cached is not None:
                self._manifests.move_to_end(key)
                return cached
        manifest = self.store.get(name, version)
        with self._lock:
            self._manifests[key] = manifest
            while len(self._manifests) > MAX_CACHED_MANIFESTS:
                self._manifests.popitem(last=False)
        return manifest

    def _version_numbers(self, name: str) -> list[int]:
        """One listing per call (always current), or per `listing_ttl_s` when that is set."""
        if self.listing_ttl_s <= 0:
            return self.store.version_numbers(name)
        now = time.monotonic()
        with self._lock:
            hit = self._listings.get(name)
        if hit is not None and now - hit[0] < self.listing_ttl_s:
            return hit[1]
        live = self.store.version_numbers(name)
        with self._lock:
            if len(self._listings) >= MAX_CACHED_MANIFESTS:
                self._listings.clear()
            self._listings[name] = (now, live)
        return live

    def fetch_bytes(self, manifest: AdapterManifest) -> bytes:
        """The verified bundle bytes of `manifest`, from the LRU or the store."""
        sha = manifest.sha256
        with self._lock:
            data = self._blobs.get(sha)
            if data is not None:
                self._blobs.move_to_end(sha)
                self._hits += 1
                return data
            self._misses += 1
        chunks = verified_chunks(self.store.stream_blob(sha), sha, manifest.size_bytes, f"blob of {manifest.ref}")
        data = b"".join(chunks)
        self._remember(sha, data)
        return data

    def fetch_bundle(self, manifest: AdapterManifest) -> AdapterBundle:
        """The parsed, format-validated bundle of `manifest` (servability is the engine's check)."""
        return load_bundle(self.fetch_bytes(manifest))

    def _remember(self, sha: str, data: bytes) -> None:
        if len(data) > self.blob_cache_bytes:
            return  # bigger than the whole cache: caching it would only evict everything
        with self._lock:
            if sha in self._blobs:
                return
            self._blobs[sha] = data
            self._blob_bytes += len(data)
            while self._blob_bytes > self.blob_cache_bytes:
                _, old = self._blobs.popitem(last=False)
                self._blob_bytes -= len(old)

    def forget(self, name: str) -> None:
        """Drop everything cached for `name` (after a delete or a new upload).

        Blobs are dropped unless a cached manifest of another name still uses them.
        """
        with self._lock:
            self._listings.pop(name, None)
            gone = [k for k in self._manifests if k[0] == name]
            shas = {self._manifests.pop(k).sha256 for k in gone}
            still_used = {m.sha256 for m in self._manifests.values()}
            for sha in shas - still_used:
                data = self._blobs.pop(sha, None)
                if data is not None:
                    self._blob_bytes -= len(data)

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._blobs), self._blob_bytes, self.blob_cache_bytes)
