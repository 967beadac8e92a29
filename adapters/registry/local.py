"""The registry in a local folder (the default `--registry`), safe across processes.

How atomicity is had on a POSIX filesystem:

* Every byte is first written to a temp file under `tmp/`, fsynced, and only then
  hard-linked to its final name (`os.link` fails if the name exists). A name therefore
  either does not exist or holds complete, durable bytes; a crash leaves at most a temp
  file, which no reader ever looks at and the next delete (or the next store opened
  while no commit runs) sweeps away.
* A version number is claimed by linking `manifests/<name>/<v>.json`; of concurrent
  committers (threads or processes) exactly one wins each number, the others retry v+1.
* `commit` holds a shared `flock` on `.lock`, `delete` an exclusive one, so blob garbage
  collection never removes a blob that an in-flight commit is about to reference. The
  kernel drops the lock of a killed process, so a crash never wedges the store.
  Readers take no lock at all: every file they can see is complete.
"""

from __future__ import annotations

from collections.abc import Iterable

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from adapters.bundle import BundleMetadata
from adapters.files import new_file_mode
from adapters.manifest import AdapterManifest, is_valid_name, name_from_storage, storage_name
from adapters.registry.store import (
    CHUNK_BYTES,
    AdapterNotFound,
    RegistryStore,
    build_manifest,
    check_record,
)


def _file_chunks(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def _fsync_dir(path: Path) -> None:
    """Make a link/unlink in `path` durable (the entry lives in the directory, not the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(RegistryStore):
    """Adapters under `root`: blobs/<sha256>, manifests/<name>/<version>.json, tmp/, .lock."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.tmp = self.root / "tmp"
        for d in (self.blobs, self.manifests, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.root / ".lock"
        self._lock_path.touch(exist_ok=True)
        self._sweep_if_idle()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- locking -----------------------------------------------------------------------

    @contextmanager
    def _locked(self, exclusive: bool, blocking: bool = True) -> Iterator[bool]:
        fd = os.open(self._lock_path, os.O_RDWR)
        try:
            flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _sweep_if_idle(self) -> None:
        """Remove temp files left by crashed commits, if no commit is running right now."""
        with self._locked(exclusive=True, blocking=False) as got:
            if got:
                self._sweep_tmp()

    def _sweep_tmp(self) -> None:
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)

    # -- paths -------------------------------------------------------------------------

    def _name_dir(self, name: str) -> Path:
        if not is_valid_name(name):  # never let a name become a path outside the root
            raise AdapterNotFound(f"adapter {name!r} not found")
        return self.manifests / storage_name(name)

    def _scan(self, name: str) -> tuple[set[int], set[int]]:
        """(versions with a manifest, versions with a tombstone) of `name`."""
        live: set[int] = set()
        dead: set[int] = set()
        try:
            entries = os.listdir(self._name_dir(name))
        except (FileNotFoundError, AdapterNotFound):
            return live, dead
        for entry in entries:
            stem, _, ext = entry.partition(".")
            if stem.isdigit() and ext in ("json", "deleted"):
                (live if ext == "json" else dead).add(int(stem))
        return live, dead

    # -- reads -------------------------------------------------------------------------

    def probe(self) -> None:
        os.listdir(self.manifests)
        if not os.access(self.tmp, os.W_OK):
            raise PermissionError(f"cannot write to {self.tmp}")

    def version_numbers(self, name: str) -> list[int]:
        live, dead = self._scan(name)
        return sorted(live - dead)

    def _read_manifest(self, name: str, version: int) -> AdapterManifest:
        d = self._name_dir(name)
        if (d / f"{version}.deleted").exists():
            raise AdapterNotFound(f"adapter {name}@{version} not found")
        try:
            return AdapterManifest.model_validate_json((d / f"{version}.json").read_bytes())
        except FileNotFoundError:
            raise AdapterNotFound(f"adapter {name}@{version} not found") from None

    def get(self, name: str, version: int | None = None) -> AdapterManifest:
        if version is not None:
            return self._read_manifest(name, version)
        for _ in range(8):  # the latest may be deleted between listing and reading: look again
            nums = self.version_numbers(name)
            if not nums:
                break
            try:
                return self._read_manifest(name, nums[-1])
            except AdapterNotFound:
                continue
        raise AdapterNotFound(f"adapter {name!r} not found")

    def list_latest(self) -> list[AdapterManifest]:
        out: list[AdapterManifest] = []
        for name in sorted(name_from_storage(part) for part in os.listdir(self.manifests)):
            if not is_valid_name(name):
                continue
            try:
                out.append(self.get(name))
            except AdapterNotFound:
                pass
        return out

    def _open_blob(self, sha256: str) -> Iterator[bytes] | None:
        try:
            f = open(self.blobs / sha256, "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            return None
        return _file_chunks(f)

    # -- writes ------------------------------------------------------------------------

    def _temp(self) -> tuple[int, Path]:
        fd, path = tempfile.mkstemp(dir=self.tmp, prefix="commit-")
        os.fchmod(fd, new_file_mode())  # mkstemp's 0600 would follow the file to its name (adapters.files)
        return fd, Path(path)

    def _fill_temp(self, chunks: Iterable[bytes]) -> tuple[Path, str, int]:
        """Write `chunks` to a new file in tmp/ while hashing them; fsynced before it is
        returned, removed if anything fails."""
        fd, tmp = self._temp()
        h = hashlib.sha256()
        size = 0
        try:
            for chunk in chunks:
                h.update(chunk)
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp, h.hexdigest(), size

    def _copy_to_temp(self, src: Path) -> tuple[Path, str, int]:
        """Copy `src` into tmp/ while hashing it."""
        with open(src, "rb", buffering=0) as f:  # raw reads: take what a pipe has, don't wait for 1 MiB
            return self._fill_temp(iter(lambda: f.read(CHUNK_BYTES), b""))

    def _write_temp(self, data: bytes) -> Path:
        return self._fill_temp([data])[0]

    def commit(self, name: str, bundle_file: Path, metadata: BundleMetadata) -> AdapterManifest:
        if not is_valid_name(name):
            raise ValueError(f"invalid adapter name {name!r}")
        with self._locked(exclusive=False):
            tmp, sha, size = self._copy_to_temp(Path(bundle_file))
            try:
                try:
                    os.link(tmp, self.blobs / sha)
                    _fsync_dir(self.blobs)
                except FileExistsError:
                    pass  # same bytes already stored (content-addressed)
            finally:
                tmp.unlink(missing_ok=True)
            d = self._name_dir(name)
            d.mkdir(exist_ok=True)
            while True:
                live, dead = self._scan(name)
                version = max(live | dead, default=0) + 1
                manifest = build_manifest(name, version, sha, size, metadata)
                tmp = self._write_temp(manifest.model_dump_json(indent=2).encode())
                try:
                    os.link(tmp, d / f"{version}.json")
                except FileExistsError:
                    continue  # another committer claimed this number first
                finally:
                    tmp.unlink(missing_ok=True)
                _fsync_dir(d)
                return manifest

    def delete(self, name: str, version: int | None = None) -> list[AdapterManifest]:
        with self._locked(exclusive=True):
            nums = self._versions_to_delete(name, version)
            d = self._name_dir(name)
            deleted: list[AdapterManifest] = []
            for v in nums:
                deleted.append(self._read_manifest(name, v))
                # Tombstone first: a crash between the two steps still leaves v deleted.
                tomb = self._write_temp(json.dumps({"deleted": True}).encode())
                try:
                    os.link(tomb, d / f"{v}.deleted")
                except FileExistsError:
                    pass
                finally:
                    tomb.unlink(missing_ok=True)
                (d / f"{v}.json").unlink(missing_ok=True)
            _fsync_dir(d)
            self._collect_garbage()
            return deleted

    # -- records -----------------------------------------------------------------------

    def _record_dir(self, folder: str, name: str | None = None) -> Path:
        check_record(folder, name)
        d = self.root / folder
        d.mkdir(exist_ok=True)
        return d

    def put_record(self, folder: str, name: str, data: bytes) -> None:
        d = self._record_dir(folder, name)
        tmp = self._write_temp(data)
        try:
            os.link(tmp, d / name)  # FileExistsError if taken: records are write-once
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(d)

    def read_record(self, folder: str, name: str) -> bytes | None:
        try:
            return (self._record_dir(folder, name) / name).read_bytes()
        except FileNotFoundError:
            return None

    def list_records(self, folder: str) -> list[str]:
        return sorted(os.listdir(self._record_dir(folder)))

    def delete_record(self, folder: str, name: str) -> bool:
        path = self._record_dir(folder, name) / name
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(path.parent)
        return True

    def _collect_garbage(self) -> None:
        """Under the exclusive lock: drop unreferenced blobs and stale temp files."""
        referenced: set[str] = set()
        for part in os.listdir(self.manifests):
            name = name_from_storage(part)
            if not is_valid_name(name):
                continue
            live, dead = self._scan(name)
            for v in live & dead:  # crashed between tombstone and unlink
                (self._name_dir(name) / f"{v}.json").unlink(missing_ok=True)
            for m in self.versions(name):
                referenced.add(m.sha256)
        for blob in self.blobs.iterdir():
            if blob.name not in referenced:
                blob.unlink(missing_ok=True)
        _fsync_dir(self.blobs)
        self._sweep_tmp()
