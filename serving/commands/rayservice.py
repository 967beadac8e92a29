"""`capaserve rayservice`: print the KubeRay RayService manifest of a configuration.

It takes every setting `capaserve serve` takes (the same flags, CAPASERVE_* variables and
`--config` file, serving/config_sources.py), so one configuration runs on a laptop and on
Kubernetes; serving/kuberay.py says what the manifest holds and why.

    capaserve rayservice --registry s3://bucket/adapters --min-replicas 1 --max-replicas 4 \\
        --image registry.example.com/capaserve:0.1.0 > rayservice.yaml
"""

from __future__ import annotations

import argparse
import sys

from serving.config_sources import PRECEDENCE, ConfigError, add_flags, config_from_namespace


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rayservice",
        help="Print a KubeRay RayService manifest serving this configuration on Kubernetes.",
        description="Print a KubeRay RayService manifest serving this configuration on Kubernetes. Secrets "
        "(admin token, API keys, AWS credentials) are not written into it: the pods read them from a Secret.",
        epilog=PRECEDENCE,
        own_env=True,
    )
    group = p.add_argument_group("manifest")
    group.add_argument("--name", default="capaserve", help="metadata.name of the RayService (default: capaserve)")
    group.add_argument("--image", default="capaserve:latest", help="Image of every pod: the Dockerfile's build (default: capaserve:latest)")
    group.add_argument("--secret", default="capaserve",
                       help="Secret whose keys CAPASERVE_ADMIN_TOKEN, CAPASERVE_API_KEYS, AWS_ACCESS_KEY_ID, "
                       "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN the pods read when present (default: capaserve)")
    group.add_argument("--worker-memory", default="16Gi", help="Memory of a worker pod (default: 16Gi)")
    add_flags(p)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from serving.kuberay import rayservice_manifest, render  # deferred: yaml only, but keep --help fast

    try:
        config = config_from_namespace(ns)
    except ConfigError as exc:
        print(f"capaserve rayservice: error: {exc}", file=sys.stderr)
        return 2
    manifest = rayservice_manifest(config, name=ns.name, image=ns.image, secret=ns.secret, worker_memory=ns.worker_memory)
    sys.stdout.write(render(manifest))
    return 0
