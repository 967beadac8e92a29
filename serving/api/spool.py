"""Spool files: where an upload lands while it is received and validated, and how leftovers go.

A spool file is removed when its request ends, whatever the outcome; only a process that
dies mid-upload (SIGKILL, OOM, power) leaves one behind, and it stayed in the temp folder
for ever (24.6 MB in one test). So every spool file lives in a folder capaserve owns
(`default_spool_dir()`, or the configured one), is named `upload-*` or `import-*`, and is
held under an exclusive `flock` by the process writing it for as long as it exists. At
start (`sweep_stale`) a server removes the spool files that no live process holds and that
are older than its own start; the kernel drops the lock of a dead process, and the age
test keeps a file that another server created a moment ago, before it took the lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

from adapters.tasks.errors import PayloadTooLarge

log = logging.getLogger("capaserve.registry")

#: Names of spool files: uploads over HTTP, and PEFT folders converted for /v1/load_lora_adapter.
PREFIXES = ("upload-", "import-")
#: When this server started (this module is imported as it starts).
STARTED = time.time()


def default_spool_dir() -> Path:
    """`<system temp>/capaserve-spool-<uid>`: one folder per user, shared by that user's servers."""
    return Path(tempfile.gettempdir()) / f"capaserve-spool-{os.getuid()}"


class Spool:
    """A locked temp file that hashes and counts what is written, refusing more than `limit` bytes."""

    def __init__(self, folder: Path | None, limit: int, prefix: str = "upload-") -> None:
        folder = folder or default_spool_dir()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=".safetensors", dir=folder)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until discard(): a sweep never takes a live upload
        self.path = Path(path)
        self.file = os.fdopen(fd, "wb")
        self.limit = limit
        self.size = 0
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise PayloadTooLarge(f"upload exceeds the limit of {self.limit} bytes")
        self.hash.update(data)
        self.file.write(data)

    def close(self) -> None:
        """Flush what was written; the file stays open (and locked) until discard()."""
        self.file.flush()

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.file.close()  # releases the lock


def sweep_stale(folder: Path | None = None, started: float = STARTED) -> list[Path]:
    """Remove spool files no live process holds and last written before `started`; returns them."""
    folder = folder or default_spool_dir()
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return removed
    for path in entries:
        if not path.name.startswith(PREFIXES) or not path.is_file():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # its upload just ended
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live upload
        else:
            if os.fstat(fd).st_mtime < started:
                path.unlink(missing_ok=True)
                removed.append(path)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d spool file(s) of interrupted uploads from %s", len(removed), folder)
    return removed
