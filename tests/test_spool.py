"""Spool files of interrupted uploads (serving/api/spool.py): what a sweep removes and what it keeps."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from serving.api.spool import Spool, sweep_stale


def test_sweep_removes_only_unheld_files_older_than_the_start(tmp_path):
    stale = tmp_path / "upload-stale.safetensors"
    stale.write_bytes(b"x" * 100)
    os.utime(stale, (time.time() - 60, time.time() - 60))
    fresh = tmp_path / "upload-fresh.safetensors"  # created after the start, lock not taken yet
    fresh.write_bytes(b"y")
    start = time.time() - 5
    os.utime(fresh, (start + 1, start + 1))
    other = tmp_path / "notes.txt"  # not a spool file
    other.write_text("keep")
    os.utime(other, (0, 0))
    live = Spool(tmp_path, limit=1000)  # held by this process
    live.write(b"z" * 10)
    os.utime(live.path, (time.time() - 60, time.time() - 60))
    # held by another live process
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from serving.api.spool import Spool;"
         f"s = Spool(Path({str(tmp_path)!r}), 10); print(s.path, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        held = child.stdout.readline().strip()
        os.utime(held, (time.time() - 60, time.time() - 60))
        removed = sweep_stale(tmp_path, started=start)
        assert removed == [stale]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, other.name, live.path.name, os.path.basename(held)])
    finally:
        child.kill()
        child.wait()
    # its process is gone: the kernel dropped the lock, so the next sweep takes the file
    assert sweep_stale(tmp_path, started=start) == [tmp_path / os.path.basename(held)]
    live.discard()
    assert not live.path.exists()


def test_spool_refuses_past_its_limit_and_default_folder_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    s = Spool(None, limit=4)
    assert s.path.parent == tmp_path / f"capaserve-spool-{os.getuid()}"
    assert (s.path.parent.stat().st_mode & 0o777) == 0o700
    s.write(b"1234")
    try:
        s.write(b"5")
    except Exception as exc:  # noqa: BLE001
        assert type(exc).__name__ == "PayloadTooLarge"
    else:
        raise AssertionError("no PayloadTooLarge")
    s.discard()
