"""The registry stores, one suite on both backends: a folder, and S3 on a real moto server."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adapters.bundle import BundleMetadata, Task, save_bundle
from adapters.registry.local import LocalStore
from adapters.registry.resolver import AdapterResolver
from adapters.registry.store import AdapterNotFound, RegistryCorrupt
from adapters.synthetic import random_bundle
from adapters.validation import BaseModelSpec
from tests.registry_support import BUCKET, S3_ENV, MotoServer, check_consistent, kill, open_store_url, snapshot

SPEC = BaseModelSpec("tiny/base", Task.FEATURE_EXTRACTION, 16, {"l0": (16, 16), "l1": (32, 16), "big": (512, 512)})
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def moto_url():
    old = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = MotoServer()
    import boto3

    boto3.client("s3", endpoint_url=server.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield server.url
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    moto = request.getfixturevalue("moto_url")
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}|{moto}"


@pytest.fixture
def store(store_url):
    return open_store_url(store_url)


def make_bundle(tmp_path: Path, seed: int = 0, *, rank: int = 2, big: bool = False) -> tuple[Path, BundleMetadata]:
    b = random_bundle(SPEC, ["big"] if big else ["l0", "l1"], rank=rank, seed=seed)
    path = save_bundle(b, tmp_path / f"bundle-{seed}-{rank}.safetensors")
    return path, b.metadata


def test_versions_latest_pinned_and_listing(store, tmp_path):
    f1, meta = make_bundle(tmp_path, 1)
    f2, _ = make_bundle(tmp_path, 2)
    m1 = store.commit("alpha", f1, meta)
    m2 = store.commit("alpha", f2, meta)
    store.commit("beta", f1, meta)
    assert (m1.version, m2.version) == (1, 2)
    assert m1.sha256 != m2.sha256 and m1.size_bytes == f1.stat().st_size
    assert store.get("alpha") == m2 and store.get("alpha", 1) == m1
    assert [m.version for m in store.versions("alpha")] == [1, 2] == store.version_numbers("alpha")
    assert [(m.name, m.version) for m in store.list_latest()] == [("alpha", 2), ("beta", 1)]
    assert store.read_blob(m1.sha256) == f1.read_bytes()
    assert m1.base_model == "tiny/base" and m1.targets == ["l0", "l1"] and m1.rank == 2
    for bad in [lambda: store.get("alpha", 3), lambda: store.get("nobody"), lambda: store.get("../etc"),
                lambda: store.read_blob("0" * 64), lambda: store.read_blob("../x")]:
        with pytest.raises(AdapterNotFound):
            bad()
    assert store.versions("nobody") == []


def test_delete_version_all_gc_and_numbers_never_reused(store, tmp_path):
    f1, meta = make_bundle(tmp_path, 1)
    f2, _ = make_bundle(tmp_path, 2)
    shared = store.commit("a", f1, meta)  # same bytes under two names: one blob
    store.commit("b", f1, meta)
    a2 = store.commit("a", f2, meta)
    assert [m.version for m in store.delete("a", 2)] == [2]
    with pytest.raises(AdapterNotFound):
        store.read_blob(a2.sha256)  # unreferenced: collected
    assert store.get("a") == shared
    assert store.commit("a", f2, meta).version == 3  # 2 stays taken
    with pytest.raises(AdapterNotFound):
        store.delete("a", 2)
    assert [m.version for m in store.delete("a")] == [1, 3]
    assert store.read_blob(shared.sha256) == f1.read_bytes()  # still used by b
    with pytest.raises(AdapterNotFound):
        store.get("a")
    with pytest.raises(AdapterNotFound):
        store.delete("a")
    assert [m.name for m in store.list_latest()] == ["b"]
    store.delete("b")
    with pytest.raises(AdapterNotFound):
        store.read_blob(shared.sha256)
    assert store.commit("a", f1, meta).version == 4
    check_consistent(store)


def test_concurrent_commits_from_threads_get_distinct_versions(store, tmp_path):
    files = [make_bundle(tmp_path, i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda fm: store.commit("hot", fm[0], fm[1]), files))
    assert sorted(m.version for m in got) == list(range(1, 9))
    by_version = {m.version: m.sha256 for m in store.versions("hot")}
    assert by_version == {m.version: m.sha256 for m in got}
    check_consistent(store)


def _commit_n(url: str, paths: list[str], meta_json: str, out) -> None:
    store = open_store_url(url)
    meta = BundleMetadata.model_validate_json(meta_json)
    out.put([store.commit("hot", Path(p), meta).version for p in paths])


def test_concurrent_commits_from_processes_get_distinct_versions(store_url, tmp_path):
    files = [make_bundle(tmp_path, i) for i in range(9)]
    ctx = multiprocessing.get_context("fork")  # torch is imported already; fork is cheap
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_commit_n, args=(store_url, [str(f) for f, _ in files[i::3]], files[0][1].model_dump_json(), out))
        for i in range(3)
    ]
    for p in procs:
        p.start()
    versions = sorted(v for _ in procs for v in out.get(timeout=60))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert versions == list(range(1, 10))
    store = open_store_url(store_url)
    assert store.version_numbers("hot") == versions
    check_consistent(store)


def _child(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.registry_support", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **S3_ENV},
    )


def test_sigkill_mid_commit_leaves_store_consistent(store_url, store, tmp_path):
    """A committing process killed (SIGKILL) while it writes the blob leaves nothing visible."""
    keep, meta = make_bundle(tmp_path, 1)
    store.commit("kept", keep, meta)
    big, big_meta = make_bundle(tmp_path, 7, rank=64, big=True)  # ~400 KiB that trickle in
    before = snapshot(store)
    if isinstance(store, LocalStore):
        fifo = tmp_path / "slow.fifo"
        os.mkfifo(fifo)
        proc = _child("commit", store_url, "crashy", str(big), str(fifo))
        data = big.read_bytes()
        with open(fifo, "wb", buffering=0) as w:  # blocks until the child opens it
            w.write(data[: len(data) // 2])
            deadline = time.monotonic() + 30
            while not any(p.stat().st_size for p in store.tmp.iterdir()):
                assert time.monotonic() < deadline, "child never started writing"
                time.sleep(0.02)
            kill(proc)
    else:
        proc = _child("slow-s3-commit", store_url, "crashy", str(big))
        assert proc.stdout.readline().strip() == "sending"  # the blob PUT is on the wire
        time.sleep(0.2)
        kill(proc)
    reopened = open_store_url(store_url)  # a fresh process's view
    assert reopened.version_numbers("crashy") == []
    assert [m.name for m in reopened.list_latest()] == ["kept"]
    check_consistent(reopened)
    after = snapshot(reopened)
    assert set(after) - set(before) == set(), "the killed commit left files/objects behind"
    assert after == before
    assert reopened.commit("crashy", big, big_meta).version == 1  # and the store still works


def test_resolver_sees_new_versions_and_deletes_and_bounds_its_cache(store, tmp_path):
    files = [make_bundle(tmp_path, i) for i in range(3)]
    size = files[0][0].stat().st_size
    resolver = AdapterResolver(store, blob_cache_bytes=2 * size + 10)
    store.commit("r", *files[0])
    m1 = resolver.resolve("r")
    assert m1.version == 1 and resolver.fetch_bundle(m1).metadata.rank == 2
    store.commit("r", *files[1])
    assert resolver.resolve("r").version == 2  # no restart, no notification
    assert resolver.resolve("r@1") == m1
    resolver.fetch_bytes(resolver.resolve("r"))
    store.commit("r", *files[2])
    resolver.fetch_bytes(resolver.resolve("r"))
    info = resolver.cache_info()
    assert info.blobs == 2 and info.bytes <= info.max_bytes and info.misses == 3
    resolver.fetch_bytes(resolver.resolve("r@3"))
    assert resolver.cache_info().hits == 1
    store.delete("r", 3)
    for ref in ["r@3", "r@0", "r@x", "nobody", "../r", "r@"]:
        with pytest.raises(AdapterNotFound):
            resolver.resolve(ref)
    assert resolver.resolve("r").version == 2
    resolver.forget("r")
    assert resolver.cache_info().blobs == 0
    store.delete("r")
    with pytest.raises(AdapterNotFound):
        resolver.resolve("r")


def test_resolver_refuses_a_blob_that_does_not_match_its_sha(tmp_path):
    store = LocalStore(tmp_path / "reg")
    f, meta = make_bundle(tmp_path)
    m = store.commit("x", f, meta)
    blob = store.blobs / m.sha256
    data = blob.read_bytes()
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit
    with pytest.raises(RegistryCorrupt):
        AdapterResolver(store, 1 << 20).fetch_bundle(m)


def test_local_store_sweeps_crash_leftovers_only_when_idle(tmp_path):
    store = LocalStore(tmp_path / "reg")
    (store.tmp / "commit-stale").write_bytes(b"half")
    with store._locked(exclusive=False):  # a commit is in flight in some process
        LocalStore(store.root)
        assert (store.tmp / "commit-stale").exists()
    LocalStore(store.root)
    assert list(store.tmp.iterdir()) == []


def test_local_delete_waits_for_an_inflight_commit(tmp_path):
    store = LocalStore(tmp_path / "reg")
    f, meta = make_bundle(tmp_path)
    store.commit("x", f, meta)
    done = threading.Event()
    with store._locked(exclusive=False):
        t = threading.Thread(target=lambda: (store.delete("x"), done.set()))
        t.start()
        assert not done.wait(0.3)
    t.join(10)
    assert done.is_set() and store.version_numbers("x") == []


def test_resolver_listing_ttl_reuses_a_listing_until_forget(tmp_path):
    store = LocalStore(tmp_path / "reg")
    f, meta = make_bundle(tmp_path)
    store.commit("t", f, meta)
    resolver = AdapterResolver(store, 1 << 20, listing_ttl_s=60)
    assert resolver.resolve("t").version == 1
    store.commit("t", f, meta)
    assert resolver.resolve("t").version == 1  # the cached listing, for remote stores
    resolver.forget("t")
    assert resolver.resolve("t").version == 2


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_local_files_take_the_umask_like_any_new_file(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        f, meta = make_bundle(tmp_path)  # save_bundle: the file `capaserve train` and `pack` write
        assert f.stat().st_mode & 0o777 == mode
        store = LocalStore(tmp_path / f"reg-{umask:o}")
        m = store.commit("x", f, meta)
    finally:
        os.umask(old)
    assert (store.blobs / m.sha256).stat().st_mode & 0o777 == mode
    assert (store.manifests / "x" / "1.json").stat().st_mode & 0o777 == mode


def test_key_lookups_answer_from_the_listing_until_it_is_older_than_the_ttl(tmp_path):
    """The ingress authenticates on its event loop while `fresh()`; a revocation made by another
    process is seen once the listing is older than `ttl_s`."""
    from adapters.registry.keys import KeyStore, Role

    writer, reader = KeyStore(LocalStore(tmp_path)), KeyStore(LocalStore(tmp_path), ttl_s=0.3)
    created = writer.create("t", Role.reader)
    assert not reader.fresh()
    assert reader.lookup(created.key).id == created.id  # lists the store
    assert reader.fresh()
    writer.revoke(created.id)
    assert reader.lookup(created.key, refresh=False).id == created.id  # the cached listing
    assert reader.any(refresh=False)
    time.sleep(0.35)
    assert not reader.fresh()
    assert reader.lookup(created.key, refresh=False) is not None  # still the old listing, as asked
    assert reader.lookup(created.key) is None and reader.fresh()
    assert not reader.any(refresh=False)
