"""Starting Ray for capaserve: the one `ray.init` of the CLI, the load test and the tests.

Serve's defaults favour isolation over overhead: user code on a second event loop, each
replica call as a Ray actor task, a log flush per request. On a small CPU host that
overhead is most of a request (proxy + ingress + model-replica plumbing cost more CPU
than a batched MiniLM forward: loadtest/results/overheads.md), so a local cluster runs Serve's
throughput-optimized mode (user code and router on the main loop, buffered request logs,
GC frozen after start) with gRPC for every hop, proxy included.

That mode also turns on direct ingress, kept here: every ingress replica runs its own HTTP
server (a port from 30000 up, same host as the proxy), so a client or load balancer that
targets it skips the proxy hop and its CPU per request. The proxy
still serves `--port` and balances over the ingress replicas; `direct_ingress_urls` lists
the direct ones. Serve holds a stopping ingress replica open at least
RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s) so a load balancer can deregister
it; a local cluster has none, so it waits 1 s.

Serve reads these variables when `ray.serve` is imported, and a deployment handle built
in the driver carries the driver's choice of transport, so `use_serve_env()` must run
before the first `import ray.serve` (the CLI does it first thing; tests in conftest).
Variables already set win, so a user can opt out (RAY_SERVE_THROUGHPUT_OPTIMIZED=0).
A joined cluster (RAY_ADDRESS) keeps its own settings: set the same variables on its nodes.

A local cluster is bound to loopback. `ray.init(_node_ip_address="127.0.0.1")` alone does
not do it: Ray turns a loopback address into the host's outward one (the node registers
under the host's outward address). Ray's one switch for a node address of 127.0.0.1 is the variable
it reads for single-host platforms, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (`LOCAL_ENV`), which
Ray reads when it is imported: `use_serve_env()` sets it before the first `import ray`, and
`init_local_ray` refuses a cluster whose node is on another address.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

#: gRPC's largest message (2 GiB - 1), what Serve's own gRPC servers already take.
GRPC_MAX_MESSAGE_BYTES = 2**31 - 1

SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    # Serve keeps gRPC's 4 MiB default for the messages between its proxy and replicas and
    # between deployments; anything larger (2,048 texts, a 16 MiB response, an adapter
    # download through the proxy) was a bare 500. The HTTP limits (docs/http-api.md#limits)
    # are what bound a request, so this one must not: every process receives up to gRPC's max.
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(GRPC_MAX_MESSAGE_BYTES),
}

log = logging.getLogger("capaserve.ray")


def ingress_on_port(port: int) -> dict[str, str]:
    """Serve settings that give the app's (one) ingress replica `port` for its own HTTP server.

    `capaserve serve` on a local cluster uses this so the URL a user hits is the ingress
    replica itself, not Serve's proxy in front of it: the proxy hop costs more CPU per
    request than a batched MiniLM forward per text. The range above `port` is
    where a replacement replica lands while the old one drains; with no load balancer to
    deregister it, a released port needs no quarantine, so a restarted ingress replica
    gets `port` back.
    """
    return {
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(min(port + 100, 65535)),
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


#: A local cluster's settings: nodes on 127.0.0.1 (see the module doc; read by Ray when it is
#: imported), and no export of Ray's own metrics, which nothing of a local cluster reads (no
#: dashboard; capaserve's /metrics is its own registry) while every process collected and
#: shipped them; Serve's metric cache is flushed each second rather than each 100 ms, which
#: lowers an idle cluster's polling (README.md#benchmarks has the figure).
LOCAL_ENV: dict[str, str] = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}


def use_serve_env(extra: dict[str, str] | None = None) -> None:
    """Put a local cluster's settings (Serve's, loopback's and `extra`) into this process's
    environment and its children's."""
    imported = [m for m in ("ray", "ray.serve") if m in sys.modules]
    wanted = {**SERVE_ENV, **LOCAL_ENV, **(extra or {})}
    added = [key for key in wanted if key not in os.environ]
    for key in added:
        os.environ[key] = wanted[key]
    if imported and added:
        log.warning("%s imported before use_serve_env(): %s may not apply to this process", imported, added)


#: Every node capaserve starts binds to loopback: nothing of a local cluster is reachable from
#: other hosts (a node started without it once registered on the host's other address).
LOOPBACK_NODE_IP = "127.0.0.1"


def init_local_ray(num_cpus: int, **kwargs: Any) -> None:
    """`ray.init` of a NEW local cluster on 127.0.0.1 with capaserve's Serve settings in its environment.

    `address="local"` always starts a cluster of its own: a plain `ray.init()` attaches to
    whatever cluster `ray start` left on the host (a dead one included) and then fails on
    `num_cpus`. Joining a cluster is only ever asked for, with RAY_ADDRESS.
    """
    use_serve_env()  # workers inherit the environment of the raylet started here
    import ray  # deferred: Ray reads LOCAL_ENV when it is first imported

    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("logging_level", logging.WARNING)
    kwargs.setdefault("_node_ip_address", LOOPBACK_NODE_IP)
    ray.init(address="local", num_cpus=num_cpus, **kwargs)
    addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
    if addresses != {LOOPBACK_NODE_IP}:
        ray.shutdown()
        raise RuntimeError(
            f"the local Ray node registered on {sorted(addresses)}, not {LOOPBACK_NODE_IP}: ray was imported "
            "before serving.ray_local.use_serve_env() set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
        )


def direct_ingress_urls(app_name: str, host: str, timeout_s: float = 30.0) -> list[str]:
    """Base URLs of `app_name`'s ingress replicas' own HTTP servers; [] with direct ingress off.

    Read from Serve's target groups (what a load balancer in front of the cluster is given),
    waiting up to `timeout_s` for running replicas. `host` replaces the node IP: a local
    cluster binds the ingress servers to the proxy's host, not the node's address.
    """
    # The one private Ray name capaserve uses: Ray 2.60 has no public call for target groups
    # (its REST API needs the dashboard, which a local cluster runs without). It only feeds
    # this listing (a log line, the load test, tests), never a request's path, and a Ray that
    # renamed it costs the listing alone; the ray[serve] bound in pyproject is tested.
    try:
        from ray.serve.context import _get_global_client  # deferred: ray.serve reads SERVE_ENV on import
    except ImportError:
        log.warning("this Ray has no serve.context._get_global_client: direct ingress URLs are not listed")
        return []

    deadline = time.monotonic() + timeout_s
    while True:
        details = _get_global_client().get_serve_details()
        groups = [g for g in details.get("target_groups", []) if g.get("protocol") == "HTTP"]
        if not any(g.get("app_name") for g in groups):  # only the proxy's group: direct ingress is off
            return []
        proxy_port = (details.get("http_options") or {}).get("port")
        mine = [g for g in groups if g.get("app_name") == app_name]
        prefix = mine[0].get("route_prefix", "/") if mine else "/"
        # an app with no running ingress replica is listed with the proxies as its targets
        ports = sorted(t["port"] for g in mine for t in g.get("targets", []) if t["port"] != proxy_port)
        if ports or time.monotonic() > deadline:
            return [f"http://{host}:{port}{prefix.rstrip('/')}" for port in ports]
        time.sleep(0.2)
