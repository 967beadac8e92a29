"""`capaserve keys create|list|revoke` and `capaserve audit` against a registry folder, with no
server: the key created is the one the store looks up, lists never show it, revoking makes it
unknown, and the audit trail has both changes."""

from __future__ import annotations

import json
import subprocess
import sys

from adapters.registry.backends import open_store
from adapters.registry.keys import KeyStore


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, timeout=120)


def test_keys_and_audit_without_a_server(tmp_path):
    reg = str(tmp_path / "registry")
    made = cli("keys", "create", "--tenant", "acme", "--role", "writer", "--name", "ci", "--registry", reg)
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["key"].startswith(f"csk_{created['id']}_") and created["tenant"] == "acme"
    none = json.loads(cli("keys", "create", "--tenant", "-", "--role", "reader", "--registry", reg).stdout)
    assert none["tenant"] is None

    store = KeyStore(open_store(reg))
    assert store.lookup(created["key"]).role.value == "writer"
    assert store.lookup(created["key"][:-1] + "x") is None
    raw = "".join(p.read_text() for p in (tmp_path / "registry" / "keys").iterdir())
    assert created["key"] not in raw  # stored hashed

    listed = [json.loads(line) for line in cli("keys", "list", "--registry", reg).stdout.splitlines()]
    assert {k["id"] for k in listed} == {created["id"], none["id"]} and all("key" not in k for k in listed)

    assert cli("keys", "revoke", created["id"], "--registry", reg).returncode == 0
    assert KeyStore(open_store(reg)).lookup(created["key"]) is None
    again = cli("keys", "revoke", created["id"], "--registry", reg)
    assert again.returncode == 1 and "no key" in again.stderr
    bad = cli("keys", "create", "--tenant", "Acme", "--role", "reader", "--registry", reg)
    assert bad.returncode == 2 and "tenant must match" in bad.stderr

    entries = [json.loads(line) for line in cli("audit", "--registry", reg).stdout.splitlines()]
    assert [(e["action"], e["name"], e["key_id"]) for e in entries] == [
        ("key.create", created["id"], "cli"), ("key.create", none["id"], "cli"), ("key.revoke", created["id"], "cli")]
