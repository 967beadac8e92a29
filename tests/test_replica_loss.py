"""Two model replicas under steady load, through real Ray Serve and real HTTP on 127.0.0.1:
a hot adapter spreads to the other replica, and `kill -9` of a replica loses no
embeddings or classify request while its replacement takes its share of the traffic.

The load is a closed loop of client threads (loadtest/faults.py); the kill is SIGKILL by
pid of a model replica process started under this test process's own Ray.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from loadtest.bench_failover import make_adapters, request_mix, run_failover
from loadtest.faults import SteadyLoad, model_replica_pids, replica_counts, round_robin
from tests.serve_helpers import running_app

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[tuple[str, dict]]]:
    folder = tmp_path_factory.mktemp("adapters")
    # max_batch_size 32: the ingress joins at most 32 texts per replica call, so each 30-text
    # request of the kill test is a call of its own and both replicas hold calls at the kill
    # (with the default 64, two requests shared a call and the killed replica was once idle).
    args = {"registry": str(folder / "registry"), "replicas": 2, "num_cpus": 1, "max_batch_size": 32}
    with running_app(args, num_cpus=2) as url:
        adapters = make_adapters(Path(folder), embed=2, classify=1)
        for name, body in adapters.items():
            r = httpx.put(f"{url}/v1/adapters/{name}", content=body, timeout=60)
            assert r.status_code == 201, r.text
        bodies = request_mix(list(adapters))
        for path, body in bodies:
            r = httpx.post(f"{url}{path}", json=body, timeout=120)
            assert r.status_code == 200, r.text
        yield url, bodies


def test_a_hot_adapter_is_served_by_both_replicas(served: tuple[str, list[tuple[str, dict]]]) -> None:
    """All traffic on one adapter: Serve's multiplexed routing keeps it on the one replica that
    loaded it (ray-project/ray#48741); with affinity bounded by load, the second replica loads
    it too and both answer a fair part of it."""
    url, bodies = served
    hot = [b for b in bodies if b[1]["model"] == "fe-00"]
    before = replica_counts(url)
    with SteadyLoad(url, round_robin(hot), users=8) as load:
        time.sleep(8)
    after = replica_counts(url)
    assert all(s.ok for s in load.snapshot()), {s.error for s in load.snapshot() if not s.ok}
    served_by = {r: after[r] - before.get(r, 0.0) for r in after}
    total = sum(served_by.values())
    assert total >= 20, served_by
    assert len(served_by) == 2 and min(served_by.values()) >= 0.25 * total, served_by


def test_kill_9_of_a_replica_loses_no_request_and_its_replacement_takes_a_share(
    served: tuple[str, list[tuple[str, dict]]]
) -> None:
    url, bodies = served
    assert len(model_replica_pids(os.getpid())) == 2
    # 30 texts a request: each call computes for a while, so the killed replica surely holds some
    heavy = [(path, {**body, "input": body["input"] * 10}) for path, body in bodies]
    result = run_failover(url, os.getpid(), heavy, users=6, warmup_s=4.0, after_s=75.0, window_s=6.0)
    assert result.failed == 0, result.errors
    assert result.before > 0 and result.after > 0
    assert result.busy_at_kill, result  # the kill landed on a computing replica...
    assert result.retries >= 1, result  # ...so it held calls, and they were answered by the other
    assert result.first_answer_s is not None, f"the replacement never answered: {result.replicas}"
    # a fair share: an even split is 1/2; Serve's own routing left it the base model's part only
    assert result.share_first is not None and result.share_first >= 0.3, result
