"""`capaserve serve`: start (or join) Ray, run the application on host:port, block until stopped.

Its flags, CAPASERVE_* variables and `--config` file are generated from `ServeConfig`
(serving/config.py, serving/config_sources.py; docs/cli.md#capaserve-serve). Ctrl-C and SIGTERM shut down cleanly: the
ingress first refuses new requests (503) and lets those in progress finish, for at most
`server.drain_timeout_s` (serving/drain.py); then Serve stops, then Ray, so a local cluster
leaves no processes behind, and the command exits within the drain timeout plus STOP_BUDGET_S.
With RAY_ADDRESS set the app joins that cluster and only Serve's app is removed on exit.

On a local cluster `--port` is served by the ingress replica itself (Serve direct ingress)
and Serve's proxy listens on a free port, logged at start: the app has one ingress replica,
so the proxy would only add a hop and its CPU per request (loadtest/results/overheads.md). Ray's own
"Application ... is ready at" line names the proxy; capaserve's "ready at" line, which names
`--port`, comes after it and is the last line of the start.
A joined cluster keeps Serve's proxy on `--port` of every node, balancing over the ingress
replicas wherever they run.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import signal
import socket
import sys
import time
from typing import Any

from serving.config_sources import PRECEDENCE, ConfigError, add_flags, config_from_namespace
from serving.stop_guard import StopGuard, node_pids

APP_NAME = "capaserve"
log = logging.getLogger("capaserve.serve")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="Serve the base model and its CapaBoost adapters over HTTP (Ray Serve).",
        description="Serve the base model and its CapaBoost adapters over HTTP (Ray Serve).",
        epilog=PRECEDENCE,
        own_env=True,  # every variable is read by config_from, beside the file and the flags
    )
    add_flags(p)
    p.set_defaults(func=run)


class _Stop(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM, so startup and the wait loop both unwind."""


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or 0.0.0.0-style wildcard: assume it is reachable from outside


def check_write_safety(host: str, admin_token: str | None, allow_unauthenticated: bool) -> None:
    """Refuse an open registry on a reachable address: an unauthenticated upload is code-free but
    still lets anyone replace what the server answers with."""
    if admin_token or allow_unauthenticated or is_loopback(host):
        return
    raise SystemExit(
        f"capaserve serve: --host {host} is reachable from other machines and no admin token is set, so "
        "anyone could upload or delete adapters. Set one with --admin-token TOKEN (or CAPASERVE_ADMIN_TOKEN), "
        "or pass --allow-unauthenticated-writes to accept the risk."
    )


def bind_check(host: str, port: int) -> int:
    """The port `host:port` can listen on (a free one for 0); OSError if it cannot, before Ray starts."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host.strip("[]"), port))
        return s.getsockname()[1]


def run(ns: argparse.Namespace) -> int:
    # Ray, and torch through serving.app, are imported below, not at the top: they take ~4 s,
    # which `capaserve --help` and a bad flag must not wait for, and use_serve_env must set
    # Serve's environment before ray.serve is first imported.
    try:
        config = config_from_namespace(ns)
    except ConfigError as exc:
        print(f"capaserve serve: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = config.server
    token = server.admin_token.get_secret_value() if server.admin_token else None
    check_write_safety(server.host, token, server.allow_unauthenticated_writes)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    local = not os.environ.get("RAY_ADDRESS")
    port = server.port
    if local:
        from serving.ray_local import ingress_on_port, use_serve_env

        if server.ingress_replicas > 1:  # at most one per node: the others would never start
            print("capaserve serve: error: a local cluster has one node, so one ingress replica; "
                  "--ingress-replicas is for a joined cluster (RAY_ADDRESS)", file=sys.stderr)
            return 2
        try:
            port = bind_check(server.host, server.port)
        except OSError as exc:
            print(f"capaserve serve: error: cannot listen on {server.host}:{server.port}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
        use_serve_env(ingress_on_port(port))  # before ray.serve is imported below
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    started_ray = serving = stopping = False
    guard = None
    try:
        import ray
        from ray import serve

        from serving.app import build_app

        address = os.environ.get("RAY_ADDRESS") or None
        if address is None:
            need = math.ceil(server.most_replicas() * config.replica_cpus())
            from serving.ray_local import init_local_ray

            init_local_ray(max(os.cpu_count() or 1, need))
            guard = StopGuard(node_pids())
        else:
            ray.init(address=address, logging_level=logging.WARNING)
        started_ray = True
        # Ray's core worker installs its own SIGTERM handler (log and abort); ours goes back on top.
        for s in previous:
            signal.signal(s, _on_signal)
        # A local cluster: the ingress replica's own server (Serve direct ingress) is --port and
        # Serve's proxy moves to a free port. A joined cluster: the proxy is --port on every node.
        proxy_port = bind_check(server.host, 0) if local else port
        serve.start(http_options={"host": server.host, "port": proxy_port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        serving = True
        if guard is not None:
            guard.record()
        if local:
            from serving.ray_local import direct_ingress_urls

            url = f"http://{server.host}:{port}"
            if url not in direct_ingress_urls(APP_NAME, server.host):
                raise SystemExit(f"capaserve serve: the ingress replica did not get {server.host}:{port} "
                                 "(RAY_SERVE_ENABLE_DIRECT_INGRESS=0, or the port was taken meanwhile)")
            log.info("Serve's HTTP proxy (same API, one more hop): http://%s:%d", server.host, proxy_port)
        sys.stdout.flush()  # Ray's lines first: the ready line below is the start's last word
        sys.stderr.flush()
        log.info(
            "capaserve ready at http://%s:%d (registry %s, %d replica(s)); Ctrl-C or SIGTERM stops it",
            server.host, port, config.registry.location, server.replicas,
        )
        while True:
            signal.pause()
    except _Stop as stop:
        log.info("received %s, shutting down", stop)
        stopping = True
        return 0
    except KeyboardInterrupt:
        log.info("interrupted, shutting down")
        stopping = True
        return 0
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        if guard is not None and stopping:
            guard.record()
            guard.arm(server.drain_timeout_s + STOP_BUDGET_S - 1.0, _exit_now)
            if guard.ray_was_signalled():
                log.info("Ray's own processes got the signal too (a process-group stop): nothing left to drain; "
                         "ended %d leftover process(es)", guard.end_all())
                _exit_now(0)
        _shutdown(started_ray, server.drain_timeout_s if serving and stopping else None)
        for s, h in previous.items():
            signal.signal(s, h)
        if stopping and started_ray:
            _exit_now(0)


def _exit_now(code: int) -> None:
    """Exit once Serve and Ray are stopped and the logs flushed, skipping the interpreter's own
    teardown: with Ray's and gRPC's extension modules loaded it took another 1.3-3 s here, with
    nothing left to do, and the stop is bounded (drain timeout + STOP_BUDGET_S)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _drain(timeout_s: float) -> int | None:
    """Let the requests in progress finish (at most `timeout_s`) while new ones are refused,
    with the model replicas still up (serving/drain.py); then Serve may stop. Returns how many
    were cut at the timeout (None: the ingress could not be asked)."""
    from ray import serve

    from serving.app import INGRESS_DEPLOYMENT

    start = time.monotonic()
    try:
        handle = serve.get_deployment_handle(INGRESS_DEPLOYMENT, APP_NAME)
        left = await asyncio.wait_for(handle.drain.remote(timeout_s), timeout_s + 2)
    except Exception:  # noqa: BLE001 - stopping goes on whatever the ingress says
        log.warning("could not drain the ingress; stopping anyway", exc_info=True)
        return None
    log.info("drained in %.1f s: new requests refused, %s", time.monotonic() - start,
             f"{left} request(s) still in progress cut at the timeout" if left else "no request in progress")
    return int(left)


#: What stopping Serve and Ray may take after the drain (the command exits within the drain timeout
#: plus this): Serve gets 3 s, Ray's own stop the rest (loadtest/results/overheads.md has their times).
STOP_BUDGET_S = 5.0


async def _stop_serve(drain_timeout_s: float | None) -> None:
    """Drain (when the app was serving), then remove the app (a joined cluster) or stop Serve,
    giving up on Serve after part of STOP_BUDGET_S (Ray's shutdown then ends its processes).
    One event loop for both: Serve's throughput mode routes a handle's calls on the caller's
    loop, and stopping Serve closes the handles made on it."""
    from ray import serve

    cut = await _drain(drain_timeout_s) if drain_timeout_s is not None else None
    joined = bool(os.environ.get("RAY_ADDRESS"))
    if cut and not joined:
        # Serve's own stop would wait on the requests the drain just gave up on: a local
        # cluster goes with Ray at once (a joined one must still lose only our app)
        log.info("stopping Ray without waiting on Serve: %d request(s) cut", cut)
        return
    start = time.monotonic()
    try:
        if joined:
            await asyncio.wait_for(asyncio.to_thread(serve.delete, APP_NAME), STOP_BUDGET_S - 1)  # only our app
        else:
            await asyncio.wait_for(serve.shutdown_async(), STOP_BUDGET_S - 2)
    except asyncio.TimeoutError:
        log.warning("Serve did not stop within %.0f s; stopping Ray", time.monotonic() - start)
    else:
        log.info("Serve stopped in %.1f s", time.monotonic() - start)


def _shutdown(started_ray: bool, drain_timeout_s: float | None = None) -> None:
    if not started_ray:
        return
    import ray

    try:
        asyncio.run(_stop_serve(drain_timeout_s))
    except Exception:  # noqa: BLE001 - still stop Ray below
        log.warning("serve shutdown failed", exc_info=True)
    finally:
        start = time.monotonic()
        ray.shutdown()
        log.info("Ray stopped in %.1f s", time.monotonic() - start)
    sys.stdout.flush()
