"""Starting Ray for capaserve: the one `ray.init` of the CLI, the load test and the tests.

Serve's defaults favour isolation over overhead: user code on a second event loop, each
replica call as a Ray actor task, a log flush per request. On a small CPU host that
overhead is most of a request (measured: proxy + ingress + model-replica plumbing cost
more CPU than a batched MiniLM forward), so a local cluster runs Serve's
throughput-optimized mode (user code and router on the main loop, buffered request logs,
GC frozen after start) with gRPC for every hop, proxy included. Direct ingress, which that
mode also turns on, is turned off: it opens a port per ingress replica that nothing here
routes to.

Serve reads these variables when `ray.serve` is imported, and a deployment handle built
in the driver carries the driver's choice of transport, so `use_serve_env()` must run
before the first `import ray.serve` (the CLI does it first thing; tests in conftest).
Variables already set win, so a user can opt out (RAY_SERVE_THROUGHPUT_OPTIMIZED=0).
A joined cluster (RAY_ADDRESS) keeps its own settings: set the same variables on its nodes.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}

log = logging.getLogger("capaserve.ray")


def use_serve_env() -> None:
    """Put capaserve's Serve settings into this process's environment (and its children's)."""
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    if "ray.serve._private.constants" in sys.modules and os.environ["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1":
        from ray.serve._private import constants

        if not constants.RAY_SERVE_USE_GRPC_BY_DEFAULT:
            log.warning("ray.serve was imported before use_serve_env(): handles built here use Ray actor calls")


def init_local_ray(num_cpus: int, **kwargs: Any) -> None:
    """`ray.init` of a new local cluster with capaserve's Serve settings in its environment."""
    use_serve_env()  # workers inherit the environment of the raylet started here
    import ray

    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("logging_level", logging.WARNING)
    ray.init(num_cpus=num_cpus, **kwargs)
