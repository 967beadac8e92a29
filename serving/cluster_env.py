"""What every replica needs from the environment `capaserve serve` (or `serve run`) was started in.

On a local cluster every replica inherits the driver's environment (the raylet is started
by it). On a joined cluster it does not: replicas run in the environment of their node,
and a registry in S3 answered `NoCredentialsError` on every call while `capaserve serve`
itself held the credentials. So `build_app` captures the environment once and hands it to
every deployment, two ways:

* `runtime_env()`: Ray's runtime environment of both deployments, for what must be set
  before a worker imports Ray Serve (the gRPC message size of serving/ray_local.py) and the
  offline switches of the model loader. Ray's runtime-env agent writes these values into
  its log, so nothing secret goes this way.
* `RegistryEnv`: the S3 registry's variables (every `AWS_*` one, and
  `CAPASERVE_S3_ENDPOINT_URL`), captured only for an `s3://` registry and passed to each
  replica with its constructor arguments (pickled, never logged; values are `SecretStr`,
  so no repr shows them). A replica applies them to its own process before it opens the
  store. The driver's values win over a node's own: the replicas then see the registry
  exactly as the process that validated the uploads did.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, SecretStr

from serving.ray_local import SERVE_ENV

#: Set before a worker imports Ray Serve, so they travel in Ray's runtime environment.
RUNTIME_ENV_VARIABLES = ("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
#: Read by the S3 store besides boto3's own AWS_* variables.
REGISTRY_VARIABLES = ("CAPASERVE_S3_ENDPOINT_URL",)


def runtime_env(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Ray runtime environment of capaserve's deployments: the driver's values, else capaserve's defaults."""
    values = {k: environ.get(k) or SERVE_ENV.get(k) for k in RUNTIME_ENV_VARIABLES}
    return {"env_vars": {k: v for k, v in values.items() if v}}


class RegistryEnv(BaseModel):
    """The registry's environment variables, carried to replicas with their arguments (see module doc)."""

    variables: dict[str, SecretStr] = {}

    @classmethod
    def capture(cls, location: str, environ: Mapping[str, str] = os.environ) -> "RegistryEnv":
        if not location.startswith("s3://"):
            return cls()  # a folder registry reads no variables
        names = [k for k in environ if k.startswith("AWS_") or k in REGISTRY_VARIABLES]
        return cls(variables={k: SecretStr(environ[k]) for k in sorted(names) if environ[k]})

    def apply(self) -> None:
        """Put the variables into this process's environment (boto3 reads them when a client is made)."""
        for name, value in self.variables.items():
            os.environ[name] = value.get_secret_value()
