"""The registry in an S3-compatible bucket (AWS S3, MinIO, R2, moto...), safe across hosts.

Same layout as the local store, under `s3://bucket/prefix/`. Atomicity comes from S3
itself: a PUT is all-or-nothing, so a client killed mid-upload leaves no object at all.

* A version number is claimed with a conditional PUT of `manifests/<name>/<v>.json`
  (`If-None-Match: *`, AWS since 2024-08, MinIO, R2 and moto >= 5.0.x): of concurrent
  committers exactly one gets each number, the others get 412 (or 409 while a rival
  write is in flight) and try v+1. Each manifest carries a random commit id in its
  object metadata and is read back after the PUT, so a server that checks the condition
  non-atomically (moto checks, then writes, on one of several threads) is caught as
  well: the loser sees another id and moves on.
* Deleting a version writes its tombstone `<v>.deleted` before removing `<v>.json`, so
  a number is never reused; a commit that finds a tombstone on its fresh claim (a
  three-way race with a delete) withdraws and retries.
* There are no locks in S3, so garbage collection works by age: a blob is removed when
  no live manifest references it AND it is older than `gc_grace_s`. Commits always
  (re)write their blob, which renews its age, and check the blob still exists after the
  manifest is in, so a delete running alongside a commit of the same bytes cannot strand
  the new version. Bundles go up in a single PUT (S3 allows 5 GiB), so there are no
  incomplete multipart uploads to clean up.

The endpoint is `endpoint_url`, else `CAPASERVE_S3_ENDPOINT_URL`, else `AWS_ENDPOINT_URL`,
else AWS. Credentials come from boto3's usual chain (env, profile, instance role).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from adapters.bundle import BundleMetadata
from adapters.manifest import AdapterManifest, is_valid_name, name_from_storage, storage_name
from adapters.registry.store import CHUNK_BYTES, AdapterNotFound, RegistryStore, build_manifest, check_record, file_digest

log = logging.getLogger(__name__)

#: How many version numbers a commit tries before it gives up (only under heavy contention).
MAX_CLAIM_ATTEMPTS = 256
_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def _body_chunks(body: Any) -> Iterator[bytes]:
    """A botocore StreamingBody in chunks; the connection goes back to the pool when done or closed."""
    try:
        yield from body.iter_chunks(CHUNK_BYTES)
    finally:
        body.close()


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


class S3Store(RegistryStore):
    """Adapters in `bucket` under `prefix`; see the module docstring for the guarantees."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", *, gc_grace_s: float = 300.0) -> None:
        self._ClientError = ClientError
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.gc_grace_s = gc_grace_s

    @classmethod
    def from_url(
        cls, url: str, *, endpoint_url: str | None = None, gc_grace_s: float = 300.0, **client_kwargs: Any
    ) -> "S3Store":
        """`s3://bucket/prefix` -> store; extra kwargs go to `boto3.client("s3", ...)`."""
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"expected s3://bucket[/prefix], got {url!r}")
        endpoint_url = (
            endpoint_url or os.environ.get("CAPASERVE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None
        )
        config = client_kwargs.pop("config", None) or Config(
            retries={"max_attempts": 5, "mode": "standard"},
            # custom endpoints (MinIO, moto) rarely have wildcard DNS for virtual-host style
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config, **client_kwargs)
        return cls(client, parsed.netloc, parsed.path, gc_grace_s=gc_grace_s)

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.bucket}/{self.prefix}')"

    # -- keys --------------------------------------------------------------------------

    def _blob_key(self, sha: str) -> str:
        return f"{self.prefix}blobs/{sha}"

    def _name_prefix(self, name: str) -> str:
        if not is_valid_name(name):  # names become key parts: keep them to docs/registry.md#names
            raise AdapterNotFound(f"adapter {name!r} not found")
        return f"{self.prefix}manifests/{storage_name(name)}/"

    def _list(self, prefix: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(page.get("Contents", []))
        return out

    @staticmethod
    def _parse_manifest_key(rest: str) -> tuple[str, int, str] | None:
        """'name/3.json' -> ('name', 3, 'json'); None for anything else."""
        part, _, leaf = rest.partition("/")
        name = name_from_storage(part)
        stem, _, ext = leaf.partition(".")
        if not is_valid_name(name) or not stem.isdigit() or ext not in ("json", "deleted"):
            return None
        return name, int(stem), ext

    def _scan_all(self, name: str | None = None) -> dict[str, tuple[set[int], set[int]]]:
        """name -> (versions with a manifest, versions with a tombstone), in one listing."""
        base = f"{self.prefix}manifests/"
        prefix = self._name_prefix(name) if name is not None else base
        state: dict[str, tuple[set[int], set[int]]] = {}
        for obj in self._list(prefix):
            parsed = self._parse_manifest_key(obj["Key"][len(base) :])
            if parsed is None:
                continue
            n, v, ext = parsed
            live, dead = state.setdefault(n, (set(), set()))
            (live if ext == "json" else dead).add(v)
        return state

    # -- reads -------------------------------------------------------------------------

    def probe(self) -> None:
        self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}manifests/", MaxKeys=1)

    def version_numbers(self, name: str) -> list[int]:
        try:
            live, dead = self._scan_all(name).get(name, (set(), set()))
        except AdapterNotFound:
            return []
        return sorted(live - dead)

    def _read_manifest(self, name: str, version: int) -> AdapterManifest:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=f"{self._name_prefix(name)}{version}.json")
        except self._ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                raise AdapterNotFound(f"adapter {name}@{version} not found") from None
            raise
        return AdapterManifest.model_validate_json(obj["Body"].read())

    def get(self, name: str, version: int | None = None) -> AdapterManifest:
        for _ in range(8):  # the latest may be deleted between listing and reading: look again
            live = self.version_numbers(name)
            if version is not None and version not in live:
                break
            if not live:
                break
            try:
                return self._read_manifest(name, version if version is not None else live[-1])
            except AdapterNotFound:
                continue
        raise AdapterNotFound(f"adapter {name}@{version} not found" if version else f"adapter {name!r} not found")

    def list_latest(self) -> list[AdapterManifest]:
        out: list[AdapterManifest] = []
        for name, (live, dead) in sorted(self._scan_all().items()):
            alive = live - dead
            if not alive:
                continue
            try:
                out.append(self._read_manifest(name, max(alive)))
            except AdapterNotFound:
                pass
        return out

    def _open_blob(self, sha256: str) -> Iterator[bytes] | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._blob_key(sha256))["Body"]
        except self._ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                return None
            raise
        return _body_chunks(body)

    def _exists(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except self._ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                return None
            raise

    # -- writes ------------------------------------------------------------------------

    def _put_blob(self, path: Path, sha: str) -> None:
        with open(path, "rb") as f:
            self.client.put_object(Bucket=self.bucket, Key=self._blob_key(sha), Body=f)

    def commit(self, name: str, bundle_file: Path, metadata: BundleMetadata) -> AdapterManifest:
        if not is_valid_name(name):
            raise ValueError(f"invalid adapter name {name!r}")
        path = Path(bundle_file)
        sha, size = file_digest(path)
        self._put_blob(path, sha)  # always: renews the blob's age for the GC grace period
        prefix = self._name_prefix(name)
        token = uuid.uuid4().hex
        version = 0
        for _ in range(MAX_CLAIM_ATTEMPTS):
            live, dead = self._scan_all(name).get(name, (set(), set()))
            version = max(live | dead | {version}, default=0) + 1
            manifest = build_manifest(name, version, sha, size, metadata)
            key = f"{prefix}{version}.json"
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=manifest.model_dump_json(indent=2).encode(),
                    ContentType="application/json",
                    IfNoneMatch="*",
                    Metadata={"commit-id": token},
                )
            except self._ClientError as exc:
                if _code(exc) in _CONFLICT_CODES:
                    continue  # another committer claimed this number first
                raise
            head = self._exists(key)
            if head is None or head.get("Metadata", {}).get("commit-id") != token:
                log.warning("S3 endpoint let another commit overwrite %s; retrying with the next version", key)
                continue
            if self._exists(f"{prefix}{version}.deleted") is not None:
                # A rival claimed and deleted this number between our listing and our PUT.
                self.client.delete_object(Bucket=self.bucket, Key=key)
                continue
            if self._exists(self._blob_key(sha)) is None:  # a concurrent GC took it: put it back
                self._put_blob(path, sha)
            return manifest
        raise RuntimeError(f"could not claim a version of {name!r} after {MAX_CLAIM_ATTEMPTS} attempts")

    def delete(self, name: str, version: int | None = None) -> list[AdapterManifest]:
        nums = self._versions_to_delete(name, version)
        prefix = self._name_prefix(name)
        deleted: list[AdapterManifest] = []
        for v in nums:
            try:
                deleted.append(self._read_manifest(name, v))
            except AdapterNotFound:
                continue  # a concurrent delete got there first
            # Tombstone first: a crash between the two steps still leaves v deleted.
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=f"{prefix}{v}.deleted", Body=b'{"deleted": true}', IfNoneMatch="*"
                )
            except self._ClientError as exc:
                if _code(exc) not in _CONFLICT_CODES:
                    raise
            self.client.delete_object(Bucket=self.bucket, Key=f"{prefix}{v}.json")
        if not deleted:
            raise AdapterNotFound(f"adapter {name!r} not found")
        self.collect_garbage()
        return deleted

    # -- records -----------------------------------------------------------------------

    def _record_key(self, folder: str, name: str) -> str:
        check_record(folder, name)
        return f"{self.prefix}{folder}/{name}"

    def put_record(self, folder: str, name: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._record_key(folder, name), Body=data, IfNoneMatch="*")
        except self._ClientError as exc:
            if _code(exc) in _CONFLICT_CODES:
                raise FileExistsError(f"{folder}/{name}") from None
            raise

    def read_record(self, folder: str, name: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._record_key(folder, name))["Body"].read()
        except self._ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                return None
            raise

    def list_records(self, folder: str) -> list[str]:
        check_record(folder)
        base = f"{self.prefix}{folder}/"
        return sorted(obj["Key"][len(base):] for obj in self._list(base))

    def delete_record(self, folder: str, name: str) -> bool:
        key = self._record_key(folder, name)
        if self._exists(key) is None:
            return False
        self.client.delete_object(Bucket=self.bucket, Key=key)
        return True

    def collect_garbage(self) -> list[str]:
        """Remove blobs no live manifest references and older than the grace period."""
        referenced: set[str] = set()
        for name, (live, dead) in self._scan_all().items():
            for v in live & dead:  # crashed between tombstone and delete
                self.client.delete_object(Bucket=self.bucket, Key=f"{self._name_prefix(name)}{v}.json")
            for v in live - dead:
                try:
                    referenced.add(self._read_manifest(name, v).sha256)
                except AdapterNotFound:
                    pass
        now = datetime.now(timezone.utc)
        removed: list[str] = []
        for obj in self._list(f"{self.prefix}blobs/"):
            sha = obj["Key"].rsplit("/", 1)[-1]
            age = (now - obj["LastModified"]).total_seconds()
            if sha not in referenced and age >= self.gc_grace_s:
                self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])
                removed.append(sha)
        return removed

