"""A KubeRay `RayService` manifest for a `ServeConfig`: the cluster form of `capaserve serve`.

`capaserve rayservice [serve's flags] --image IMAGE` prints it (serving/commands/rayservice.py);
docs/kubernetes.md shows one. The same settings a local `capaserve serve` takes become the
application's `args` (serving.app:build_app), minus what must not be written into a
manifest: the admin token and API keys come from a Kubernetes Secret as CAPASERVE_*
variables, which build_app layers on top of `args`, and the registry's AWS_* credentials
from the same Secret. Decisions, each for a reason:

* Model replicas run on a GPU worker group (the Dockerfile's CUDA image), one replica per
  worker pod (`num_gpus` 1 unless given). The group's pod count follows the model
  deployment: `replicas` pods, or `min_replicas`..`max_replicas` with KubeRay's in-tree
  autoscaler turned on, which adds a pod when Serve's autoscaling asks for a replica that
  does not fit.
* The head runs no model replica (`num-cpus: 0`): a head pod lost takes the cluster with
  it, and keeping it light keeps it up.
* One ingress replica per node, at least 2: Serve's proxy on each node routes to the ingress
  replica on its own node, so losing a pod leaves the others serving
  (tests/test_cluster_node_loss.py).
* Serve listens on every interface of a pod, so the pods need CAPASERVE_ADMIN_TOKEN from the
  Secret (they do not start without it) unless `--allow-unauthenticated-writes` is given,
  the rule `capaserve serve` applies to a reachable host.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from serving.config import ServeConfig

#: Variables taken from the Secret when it has them (`optional`: a missing key is no error).
SECRET_VARIABLES = (
    "CAPASERVE_ADMIN_TOKEN", "CAPASERVE_API_KEYS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
)
RAY_VERSION = "2.60.0"
HTTP_PORT = 8000


def _args(config: ServeConfig) -> dict[str, Any]:
    """The settings that differ from their defaults, without secrets and the HTTP address (http_options has it)."""
    args = config.model_dump(mode="json", exclude_defaults=True)
    server = args.get("server", {})
    for key in ("admin_token", "api_keys", "host", "port"):
        server.pop(key, None)
    if not server:
        args.pop("server", None)
    return args


def _container(name: str, image: str, secret: str, resources: dict[str, Any], token_required: bool) -> dict[str, Any]:
    env = [
        {"name": var, "valueFrom": {"secretKeyRef": {
            "name": secret, "key": var, "optional": not (token_required and var == "CAPASERVE_ADMIN_TOKEN"),
        }}}
        for var in SECRET_VARIABLES
    ]
    return {
        "name": name,
        "image": image,
        "env": env,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        # Ray's object store and workers need more /dev/shm than a container's 64 MiB default
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }


def _pod(container: dict[str, Any], ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    if ports:
        container = {**container, "ports": ports}
    return {"spec": {"containers": [container], "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]}}


def rayservice_manifest(config: ServeConfig, *, name: str = "capaserve", image: str = "capaserve:latest",
                        secret: str = "capaserve", worker_memory: str = "16Gi") -> dict[str, Any]:
    """The RayService of `config` (see the module doc for the layout and why)."""
    server = config.server
    # Serve listens on every interface of a pod, so, as `capaserve serve` on a reachable host, the
    # pods need the admin token (a Secret without it keeps them from starting) unless told otherwise.
    token_required = not server.allow_unauthenticated_writes
    gpus = 1.0 if server.num_gpus is None else server.num_gpus
    cpus = server.num_cpus or 1.0
    pods_min, pods_max = server.lowest_replicas(), server.most_replicas()
    ingress = max(2, pods_min, server.ingress_replicas)
    resolved = config.model_copy(update={"server": server.model_copy(update={
        "num_gpus": gpus, "num_cpus": cpus, "ingress_replicas": ingress,
    })})
    serve_config = {
        "http_options": {"host": "0.0.0.0", "port": HTTP_PORT},
        "applications": [{
            "name": "capaserve",
            "import_path": "serving.app:build_app",
            "route_prefix": "/",
            "args": _args(resolved),
        }],
    }
    worker_resources: dict[str, Any] = {"cpu": str(math.ceil(cpus)), "memory": worker_memory}
    if gpus > 0:
        worker_resources["nvidia.com/gpu"] = math.ceil(gpus)
    worker_group = {
        "groupName": "gpu-workers" if gpus > 0 else "workers",
        "replicas": server.replicas,
        "minReplicas": max(pods_min, 1),
        "maxReplicas": pods_max,
        "rayStartParams": {},
        "template": _pod(_container("ray-worker", image, secret, worker_resources, token_required)),
    }
    head_ports = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": HTTP_PORT, "name": "serve"}]
    cluster: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": server.autoscaling,
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(
                _container("ray-head", image, secret, {"cpu": "2", "memory": "8Gi"}, token_required), head_ports
            ),
        },
        "workerGroupSpecs": [worker_group],
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {"serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False), "rayClusterConfig": cluster},
    }


def render(manifest: dict[str, Any]) -> str:
    """The manifest as YAML, `serveConfigV2` as a literal block (KubeRay takes it as a string)."""

    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # no &anchors: every block reads on its own
            return True

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False)


__all__ = ["SECRET_VARIABLES", "rayservice_manifest", "render"]
