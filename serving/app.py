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

import os
from collections.abc import Mapping
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from serving.cluster_env import RegistryEnv, runtime_env
from serving.coalesce import CALLS_PER_WORKER
from serving.config import ServeConfig
from serving.config_sources import config_from
from serving.deployments import ModelServer
from serving.ingress import Ingress
from serving.routing import router_config

#: The ingress deployment's name (`capaserve serve` drains it by name before stopping Serve).
INGRESS_DEPLOYMENT = "CapaserveIngress"


def build_app(config: ServeConfig | Mapping[str, Any] | None = None) -> Application:
    """The Ray Serve application: the HTTP ingress bound to the model deployment.

    The model deployment runs `server.replicas` replicas (between `min_replicas` and
    `max_replicas` when autoscaling), each with `server.num_cpus` CPUs and its GPUs
    (`ServerConfig.gpus_per_replica` of the cluster's GPUs), and room for
    `scheduler.max_queue` requests in flight (its scheduler needs them queued to batch
    them); beyond that Ray holds up to `max_queue` more per replica in the caller, then
    answers with back-pressure, which the ingress maps to 503. Autoscaling targets 2 calls
    in flight per engine worker of a replica: the ingress joins requests so that each worker
    has one call computing and one queued (`CALLS_PER_WORKER`, serving/coalesce.py), so more
    than that means requests wait at the ingress. The ingress reserves no CPU, as it only
    parses, routes and records metrics; with more than one, each runs on its own node. Both
    deployments carry the driver's environment that replicas need (serving/cluster_env.py). A mapping (as
    `serve run` and a KubeRay RayService pass `args`) becomes a ServeConfig with the
    CAPASERVE_* variables of this process on top, as `capaserve serve` layers its settings,
    so secrets (CAPASERVE_ADMIN_TOKEN) can come from the environment instead of the file.
    """
    if not isinstance(config, ServeConfig):  # `serve run` args: CAPASERVE_* variables apply on top, as for the CLI
        config = config_from({}, os.environ, base=config or {})
    # replicas get the host- and cluster-derived numbers
    config = config.resolved(_cluster_gpus())
    server, queue = config.server, config.scheduler.max_queue
    workers, _ = config.engine_plan(config.device_type())
    env = runtime_env()
    registry_env = RegistryEnv.capture(config.registry.location)
    scaling: dict[str, Any] = {"num_replicas": server.replicas}
    if server.autoscaling:
        scaling = {"autoscaling_config": {
            "min_replicas": server.lowest_replicas(),
            "initial_replicas": server.replicas,
            "max_replicas": server.most_replicas(),
            "target_ongoing_requests": CALLS_PER_WORKER * workers,
        }}
    # `capaserve serve` drains the ingress itself before it stops Serve (serving/drain.py), so
    # Serve's own stop finds nothing left and checks often; without it (`serve run`, a cluster's
    # own stop) Serve waits up to the same drain timeout for requests in progress.
    stopping = {"graceful_shutdown_wait_loop_s": 0.2, "graceful_shutdown_timeout_s": server.drain_timeout_s}
    model = serve.deployment(
        ModelServer,
        name="CapaserveModel",
        **scaling,
        max_ongoing_requests=queue,
        max_queued_requests=queue * server.most_replicas(),
        ray_actor_options={
            "num_cpus": server.num_cpus,
            "num_gpus": server.num_gpus,
            "runtime_env": env,
        },
        health_check_period_s=5,
        # adapter affinity bounded by load: two calls per engine worker before anything spreads
        request_router_config=router_config(CALLS_PER_WORKER * workers, server.affinity_load_factor),
        **stopping,
    ).bind(config, registry_env=registry_env)
    ingress = serve.deployment(
        Ingress,
        name=INGRESS_DEPLOYMENT,
        num_replicas=server.ingress_replicas,
        # one per node: a node's proxy routes to the ingress replica on its own node, so
        # losing a node must not take every ingress replica with it
        **({"max_replicas_per_node": 1} if server.ingress_replicas > 1 else {}),
        max_ongoing_requests=max(1000, queue * server.most_replicas() * 2),
        ray_actor_options={"num_cpus": 0, "runtime_env": env},
        **stopping,
    ).bind(model, config, registry_env=registry_env)
    return ingress


def _cluster_gpus() -> float:
    """GPUs of the Ray cluster this process is connected to (0 when not connected)."""
    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
