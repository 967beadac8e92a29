"""`build_app(config) -> Application`: the one application the CLI, Python and `serve run` serve.

A `serve run` config file points its import path here and passes a `ServeConfig`
(serving/config.py) as `args`, nested by section as in a `capaserve serve --config` file;
the CLI builds the same ServeConfig from flags, environment and file:

    applications:
      - name: capaserve
        import_path: serving.app:build_app
        args:
          engine: {model: /models/minilm}
          registry: {location: s3://bucket/adapters}
          server: {replicas: 2}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application

from serving.config import ServeConfig
from serving.deployments import ModelServer
from serving.ingress import Ingress
from serving.routing import router_config

#: The ingress deployment's name (`capaserve serve` drains it by name before stopping Serve).
INGRESS_DEPLOYMENT = "CapaserveIngress"


def build_app(config: ServeConfig | Mapping[str, Any] | None = None) -> Application:
    """The Ray Serve application: the HTTP ingress bound to the model deployment.

    The model deployment runs `server.replicas` replicas, each with `server.num_cpus` CPUs
    and room for `scheduler.max_queue` requests in flight (its scheduler needs them queued
    to batch them); beyond that Ray holds up to `max_queue` more per replica in the caller,
    then answers with back-pressure, which the ingress maps to 503. The ingress reserves no
    CPU, as it only parses, routes and records metrics. A mapping (as `serve run` passes
    `args`) is validated into a ServeConfig.
    """
    config = ServeConfig.model_validate(config or {}).resolved()  # replicas get the host-derived numbers
    server, queue = config.server, config.scheduler.max_queue
    # `capaserve serve` drains the ingress itself before it stops Serve (serving/drain.py), so
    # Serve's own stop finds nothing left and checks often; without it (`serve run`, a cluster's
    # own stop) Serve waits up to the same drain timeout for requests in progress.
    stopping = {"graceful_shutdown_wait_loop_s": 0.2, "graceful_shutdown_timeout_s": server.drain_timeout_s}
    model = serve.deployment(
        ModelServer,
        name="CapaserveModel",
        num_replicas=server.replicas,
        max_ongoing_requests=queue,
        max_queued_requests=queue * server.replicas,
        ray_actor_options={"num_cpus": server.num_cpus, "num_gpus": server.num_gpus},
        health_check_period_s=5,
        # adapter affinity bounded by load: two calls per engine worker before anything spreads
        request_router_config=router_config(2 * config.engine_plan(config.device_type())[0], server.affinity_load_factor),
        **stopping,
    ).bind(config)
    ingress = serve.deployment(
        Ingress,
        name=INGRESS_DEPLOYMENT,
        num_replicas=1,
        max_ongoing_requests=max(1000, queue * server.replicas * 2),
        ray_actor_options={"num_cpus": 0},
        **stopping,
    ).bind(model, config)
    return ingress
