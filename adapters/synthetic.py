"""Random CapaBoost bundles for a given base model: used by tests, benchmarks and the
load test to register many distinct adapters without training any."""

from __future__ import annotations

import torch

from adapters.bundle import CLASSIFICATION_TASKS, AdapterBundle, BundleMetadata, Task, TargetFactors
from adapters.capaboost_linear import random_masks
from adapters.masks import MaskEncoding, mask_shape, seed_mask
from adapters.validation import BaseModelSpec


def random_bundle(
    spec: BaseModelSpec,
    targets: list[str],
    *,
    rank: int = 8,
    num_copies: int = 2,
    density: float = 0.5,
    alpha: float = 16.0,
    seed: int = 0,
    task: Task | None = None,
    labels: list[str] | None = None,
    pooling: str | None = None,
    dense: bool | None = None,
    std: float = 0.05,
    dtype: torch.dtype = torch.float32,
    description: str | None = None,
    mask_encoding: MaskEncoding | None = None,
    mask_seed: int | None = None,
) -> AdapterBundle:
    """A bundle with N(0, std) factors (both A and B non-zero, so the delta is visible).

    `task` defaults to what the base serves plainly (causal-lm or feature-extraction).
    Classification heads default to what each task's transformers model has: sequence
    classification mean-pooled with a dense+tanh layer, image classification on the first
    (cls) token without one, as `ViTForImageClassification`; `pooling` and `dense` override.
    A question-answering head is `head.qa` [2, hidden].
    `mask_encoding` seed draws the masks from the generator of `mask_seed` (default `seed`).
    """
    g = torch.Generator().manual_seed(seed)
    task = task or (Task.CAUSAL_LM if spec.task is Task.CAUSAL_LM else Task.FEATURE_EXTRACTION)
    if mask_encoding == "seed" and mask_seed is None:
        mask_seed = seed
    factors: dict[str, TargetFactors] = {}
    for t in targets:
        out_f, in_f = spec.linear_shapes[t]
        a = (torch.randn(rank, in_f, generator=g) * std).to(dtype)
        b = (torch.randn(out_f, rank, generator=g) * std).to(dtype)
        if mask_encoding == "seed":
            assert mask_seed is not None
            m_a, m_b = (seed_mask(mask_seed, t, m, mask_shape(m, num_copies, rank, in_f, out_f), density) for m in ("A", "B"))
        else:
            m_a = random_masks(num_copies, (rank, in_f), density, g)
            m_b = random_masks(num_copies, (out_f, rank), density, g)
        factors[t] = TargetFactors(lora_A=a, lora_B=b, mask_A=m_a, mask_B=m_b)
    h = spec.hidden_size
    head: dict[str, torch.Tensor] = {}
    image = task is Task.IMAGE_CLASSIFICATION
    if task in CLASSIFICATION_TASKS:
        labels = labels or ["negative", "positive"]
        pooling = pooling or ("cls" if image else "mean")
        if dense if dense is not None else not image:
            head["head.dense.weight"] = torch.randn(h, h, generator=g) * (1.0 / h**0.5)
            head["head.dense.bias"] = torch.randn(h, generator=g) * 0.01
        head["head.out.weight"] = torch.randn(len(labels), h, generator=g) * (1.0 / h**0.5)
        head["head.out.bias"] = torch.randn(len(labels), generator=g) * 0.01
    elif task is Task.QUESTION_ANSWERING:
        head["head.qa.weight"] = torch.randn(2, h, generator=g) * (1.0 / h**0.5)
        head["head.qa.bias"] = torch.randn(2, generator=g) * 0.01
    classifier = task in CLASSIFICATION_TASKS
    meta = BundleMetadata(
        base_model=spec.model_id,
        task=task,
        rank=rank,
        num_copies=num_copies,
        alpha=alpha,
        density=density,
        targets=list(targets),
        labels=labels if classifier else None,
        pooling=pooling if classifier else None,  # type: ignore[arg-type] - checked by BundleMetadata
        description=description,
        mask_encoding=mask_encoding,
        mask_seed=mask_seed if mask_encoding == "seed" else None,
    )
    return AdapterBundle(metadata=meta, targets=factors, head=head)
