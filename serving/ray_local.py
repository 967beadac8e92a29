"""Starting Ray for capaserve: the one `ray.init` of the CLI, the load test and the tests.

Serve's defaults favour isolation over overhead: user code on a second event loop, each
replica call as a Ray actor task, a log flush per request. On a small CPU host that
overhead is most of a request (measured: proxy + ingress + model-replica plumbing cost
about as much CPU as a batched MiniLM forward), so a local cluster starts with Serve's
throughput-optimized mode (gRPC between deployments, user code and router on the main
loop, buffered request logs, GC frozen after start). Direct ingress, which that mode also
turns on, is turned off: it opens a port per ingress replica that nothing here routes to.
Variables already set win, so a user can opt out (RAY_SERVE_THROUGHPUT_OPTIMIZED=0).
A joined cluster (RAY_ADDRESS) keeps its own settings: set the same variables on its nodes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
}


def init_local_ray(num_cpus: int, **kwargs: Any) -> None:
    """`ray.init` of a new local cluster with capaserve's Serve settings in its environment."""
    import ray

    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)  # workers inherit the environment of the raylet we start
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("logging_level", logging.WARNING)
    ray.init(num_cpus=num_cpus, **kwargs)
