"""The startup guard of `dtype auto`: a base runs in bfloat16 only if a fixed probe set gives
the same answers as in float32, within the bounds below; else it stays float32.

Bounds, per kind of base (what a client reads off the outputs):

- text encoder: a few fixed sentences; every sentence's mean-pooled and first-token vectors
  (what embeddings and classification heads read) have cosine >= `COSINE_BOUND` (0.999) with
  their float32 vectors. all-MiniLM-L6-v2 in bfloat16 gives >= 0.9999 on them, so the bound
  leaves room for other bases while catching one whose activations overflow or lose their
  small components (cosine falls to 0.9-0.99 there).
- image encoder: a fixed synthetic image (seeded pixels) through the base's own image
  processor; the mean over all positions (what image embeddings read), the same cosine bound.
- causal LM: a short fixed prompt; at every position the next-token argmax is the same
  (greedy decoding starts the same) and no token's probability moves by more than
  `PROB_BOUND` (0.05), so sampling draws from nearly the same distribution.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

log = logging.getLogger("capaserve.precision")

COSINE_BOUND = 0.999
PROB_BOUND = 0.05

PROBE_SENTENCES = (
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "A replica keeps pristine copies of the targeted weights and rewrites them in place.",
    "Wie viel kostet eine Fahrkarte nach Berlin?",
    "0.5 + 0.25 = 0.75; 12,345 items shipped on 2024-01-31.",
    "Short.",
)
PROBE_PROMPT = "The capital of France is Paris. The capital of Germany is"

ProbeKind = Literal["text", "image", "causal-lm"]


class PrecisionChoice(BaseModel):
    """Which dtype the base's weights are in, and why (shown on the base's /v1/models card)."""

    dtype: str = Field(..., description="The weights' dtype: float32, bfloat16 or float16.")
    requested: str = Field(..., description="The dtype setting: auto or an explicit dtype.")
    reason: str = Field(..., description="Why this dtype: set explicitly, the hardware, or the guard's verdict.")
    probe: dict[str, float] = Field(
        default_factory=dict, description="The guard's measured agreement with float32 (empty without a guard run)."
    )


def probe_image() -> Any:
    """A fixed 64x64 RGB image of seeded random pixels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), mode="RGB")


@torch.no_grad()
def probe_outputs(
    model: torch.nn.Module, kind: ProbeKind, tokenizer: Any = None, processor: Any = None
) -> torch.Tensor:
    """The probe set's outputs in float32: [n, 2, H] (mean, first token) for a text encoder,
    [1, H] for an image encoder, [1, L, V] next-token probabilities for a causal LM."""
    p = next(model.parameters())
    if kind == "image":
        pixels = processor(images=[probe_image()], return_tensors="pt")["pixel_values"]
        hidden = model(pixel_values=pixels.to(device=p.device, dtype=p.dtype)).last_hidden_state
        return hidden.float().mean(dim=1)
    if kind == "causal-lm":
        batch = tokenizer([PROBE_PROMPT], return_tensors="pt").to(p.device)
        return torch.softmax(model(**batch).logits.float(), dim=-1)
    batch = tokenizer(list(PROBE_SENTENCES), padding=True, return_tensors="pt").to(p.device)
    hidden = model(**batch).last_hidden_state.float()
    m = batch["attention_mask"].float().unsqueeze(-1)
    mean = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return torch.stack([mean, hidden[:, 0]], dim=1)


def agreement(kind: ProbeKind, reference: torch.Tensor, low: torch.Tensor) -> dict[str, float]:
    """How close the low-precision probe outputs are to the float32 ones."""
    if kind == "causal-lm":
        return {
            "argmax_equal": float(torch.equal(reference.argmax(-1), low.argmax(-1))),
            "max_abs_prob_diff": float((reference - low).abs().max()),
        }
    cos = torch.nn.functional.cosine_similarity(reference.double(), low.double(), dim=-1)
    return {"min_cosine": float(cos.min())}


def within_bounds(kind: ProbeKind, metrics: dict[str, float]) -> bool:
    if kind == "causal-lm":
        return metrics["argmax_equal"] == 1.0 and metrics["max_abs_prob_diff"] <= PROB_BOUND
    return metrics["min_cosine"] >= COSINE_BOUND


def describe_bounds(kind: ProbeKind) -> str:
    if kind == "causal-lm":
        return f"argmax equal and max |p diff| <= {PROB_BOUND}"
    return f"cosine >= {COSINE_BOUND}"


def guard(
    model: torch.nn.Module, dtype: torch.dtype, probe: Callable[[torch.nn.Module], torch.Tensor], kind: ProbeKind
) -> tuple[bool, dict[str, float]]:
    """Run `probe` on the float32 `model`, cast the model to `dtype` in place, run it again.

    Returns (outputs within bounds, the agreement measured). The model is left in `dtype`
    either way: a cast back would not restore float32 weights, so the caller reloads on failure.
    """
    reference = probe(model)
    model.to(dtype)
    metrics = agreement(kind, reference, probe(model))
    return within_bounds(kind, metrics), metrics
