"""`capaserve serve`: start (or join) Ray, run the application on host:port, block until stopped.

Flags are those of docs/cli.md#capaserve-serve plus the tuning knobs of `ServeArgs`; each also reads
CAPASERVE_<FLAG> (see serving.cli). Ctrl-C and SIGTERM shut down cleanly: Serve first
(replicas drain and exit), then Ray, so a local cluster leaves no processes behind.
With RAY_ADDRESS set the app joins that cluster and only Serve's app is removed on exit.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import signal
import sys
from typing import Any

APP_NAME = "capaserve"
log = logging.getLogger("capaserve.serve")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="Serve the base model and its CapaBoost adapters over HTTP (Ray Serve).")
    p.add_argument("--model", default=None, help="Base model folder or cached hub id (default: the embedded all-MiniLM-L6-v2).")
    p.add_argument("--served-model-name", default=None, help="Base model id clients send (default: the --model id).")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: 127.0.0.1).")
    p.add_argument("--port", type=int, default=8000, help="HTTP port; /metrics is served there too (default: 8000).")
    p.add_argument("--registry", default=None, help="Adapter registry folder or s3://bucket/prefix "
                   "(default: $XDG_CACHE_HOME or ~/.cache, then capaserve/registry).")
    p.add_argument("--registry-endpoint-url", default=None, help="S3-compatible endpoint for an s3:// registry.")
    p.add_argument("--admin-token", default=None, help="Bearer token required for registry writes.")
    p.add_argument("--api-keys", default=None, help="Comma-separated bearer tokens accepted for inference.")
    p.add_argument("--allow-unauthenticated-writes", action="store_true",
                   help="RISK: let anyone who reaches a non-loopback --host upload and delete adapters "
                   "(without it, such a host needs --admin-token).")
    knob = _knob(p)
    knob("--replicas", int, "Model replicas")
    knob("--num-cpus", float, "CPUs per model replica; sets torch threads")
    knob("--num-gpus", float, "GPUs per model replica")
    p.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    knob("--dtype", str, "auto, float32, float16 or bfloat16")
    knob("--max-batch-size", int, "Most requests per batch")
    knob("--batch-wait-ms", float, "Longest wait in ms for a batch to fill")
    knob("--max-adapters-per-replica", int, "Adapters kept loaded per replica (memory is bounded by the engine's byte budget)")
    knob("--max-queue", int, "Queued requests per replica before 503")
    knob("--max-upload-bytes", int, "Largest adapter upload accepted; 413 beyond")
    p.add_argument("--no-grouping", action="store_true", help="Swap per request instead of grouping by adapter (baseline).")
    p.add_argument("--adapter-mode", choices=["merged", "adaptive"], default=None,
                   help="merged: one merged adapter per batch; adaptive: mixed-adapter batches when many adapters "
                   "wait (default: adaptive).")
    p.set_defaults(func=run)


def _knob(p: argparse.ArgumentParser) -> Any:
    """Adds a tuning flag whose default is ServeArgs' own (one source of defaults; None = unset)."""
    from serving.app import ServeArgs

    def add(flag: str, kind: type, text: str) -> None:
        default = ServeArgs.model_fields[flag.lstrip("-").replace("-", "_")].default
        p.add_argument(flag, type=kind, default=None, help=f"{text} (default: {default}).")

    return add


def serve_args_from(ns: argparse.Namespace) -> Any:
    """ServeArgs from parsed flags; unset optional flags keep ServeArgs' defaults."""
    from serving.app import ServeArgs

    given = {
        "model": ns.model,
        "served_model_name": ns.served_model_name,
        "host": ns.host,
        "port": ns.port,
        "registry": ns.registry,
        "registry_endpoint_url": ns.registry_endpoint_url,
        "admin_token": ns.admin_token or None,
        "api_keys": ns.api_keys,
        "replicas": ns.replicas,
        "num_cpus": ns.num_cpus,
        "num_gpus": ns.num_gpus,
        "device": ns.device,
        "dtype": ns.dtype,
        "max_batch_size": ns.max_batch_size,
        "batch_wait_ms": ns.batch_wait_ms,
        "max_adapters_per_replica": ns.max_adapters_per_replica,
        "max_queue": ns.max_queue,
        "max_upload_bytes": ns.max_upload_bytes,
        "grouping": not ns.no_grouping,
        "adapter_mode": ns.adapter_mode,
    }
    return ServeArgs(**{k: v for k, v in given.items() if v is not None})


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


def run(ns: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_write_safety(ns.host, ns.admin_token or None, ns.allow_unauthenticated_writes)
    args = serve_args_from(ns)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.environ.get("RAY_ADDRESS"):
        from serving.ray_local import use_serve_env

        use_serve_env()  # before ray.serve is imported below
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    started_ray = False
    try:
        import ray
        from ray import serve

        from serving.app import build_app

        address = os.environ.get("RAY_ADDRESS") or None
        if address is None:
            need = math.ceil(args.replicas * args.num_cpus)
            from serving.ray_local import init_local_ray

            init_local_ray(max(os.cpu_count() or 1, need))
        else:
            ray.init(address=address, logging_level=logging.WARNING)
        started_ray = True
        # Ray's core worker installs its own SIGTERM handler (log and abort); ours goes back on top.
        for s in previous:
            signal.signal(s, _on_signal)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        log.info(
            "capaserve ready at http://%s:%d (registry %s, %d replica(s)); Ctrl-C or SIGTERM stops it",
            args.host, args.port, args.registry, args.replicas,
        )
        if address is None:
            from serving.ray_local import direct_ingress_urls

            for url in direct_ingress_urls(APP_NAME, args.host):
                log.info("direct ingress (same API, skips the proxy hop): %s", url)
        while True:
            signal.pause()
    except _Stop as stop:
        log.info("received %s, shutting down", stop)
        return 0
    except KeyboardInterrupt:
        log.info("interrupted, shutting down")
        return 0
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        _shutdown(started_ray)
        for s, h in previous.items():
            signal.signal(s, h)


def _shutdown(started_ray: bool) -> None:
    if not started_ray:
        return
    import ray
    from ray import serve

    try:
        if os.environ.get("RAY_ADDRESS"):
            serve.delete(APP_NAME)  # a shared cluster: remove only our app
        else:
            serve.shutdown()
    except Exception:  # noqa: BLE001 - still stop Ray below
        log.warning("serve shutdown failed", exc_info=True)
    finally:
        ray.shutdown()
    sys.stdout.flush()
