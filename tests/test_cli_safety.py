"""`capaserve` start-up guards, without Ray: an open registry is refused off loopback, and a
missing optional extra is named, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serving.commands.serve import check_write_safety, is_loopback


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.0.0.9", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.4", False), ("example.org", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_open_registry_off_loopback_needs_a_token_or_the_risk_flag():
    with pytest.raises(SystemExit, match="--admin-token"):
        check_write_safety("0.0.0.0", None, False)
    check_write_safety("0.0.0.0", "secret", False)
    check_write_safety("0.0.0.0", None, True)
    check_write_safety("127.0.0.1", None, False)


def test_serve_refuses_to_start_on_a_public_host_without_a_token():
    env_clear = {"CAPASERVE_ADMIN_TOKEN": "", "CAPASERVE_ALLOW_UNAUTHENTICATED_WRITES": "0"}
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env_clear})
    assert proc.returncode != 0
    assert "--allow-unauthenticated-writes" in proc.stderr and "Ray" not in proc.stderr


def test_loadtest_without_its_extra_names_the_extra():
    code = ("import sys; sys.modules['httpx'] = None; from serving.cli import main; "
            "main(['--help'])")
    helped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "loadtest" in helped.stdout, helped.stderr
    code = "import sys; sys.modules['httpx'] = None; from serving.cli import main; main(['loadtest', '--users', '2'])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "pip install 'capaserve[loadtest]'" in run.stderr, run.stderr


def test_serve_refuses_more_ingress_replicas_than_a_local_cluster_has_nodes():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--ingress-replicas", "2"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "one ingress replica" in proc.stderr and "Ray" not in proc.stderr
