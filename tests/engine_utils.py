"""Independent references for the engine tests: the merge rule computed by hand in float64
and plain transformers models whose target weights were replaced by hand; and `embed` /
`classify` (and their mixed forms), the tests' shorthand over `Engine.encode`."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoModel, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from adapters.bundle import AdapterBundle, Task
from adapters.synthetic import random_bundle
from serving.config import EngineConfig
from serving.engine.engine import Engine
from serving.engine.outputs import EncodedRow

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def hand_delta(bundle: AdapterBundle, target: str) -> torch.Tensor:
    """docs/merge.md#merge-rule literally, in float64: (alpha/r) * sum_i (B*M_B[i]) @ (A*M_A[i])."""
    m, f = bundle.metadata, bundle.targets[target]
    a, b = f.lora_A.double(), f.lora_B.double()
    total = torch.zeros(f.out_features, f.in_features, dtype=torch.float64)
    for i in range(m.num_copies):
        total += (b * f.mask_B[i]) @ (a * f.mask_A[i])
    return total * (m.alpha / m.rank)


def plain_model(folder: Path, task: Task, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    cls = AutoModelForCausalLM if task is Task.CAUSAL_LM else AutoModel
    return cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True).eval()


@torch.no_grad()
def hand_merge(model: torch.nn.Module, bundle: AdapterBundle) -> torch.nn.Module:
    """Replace each target weight by W + delta_W (transposed for Conv1D), computed in float64."""
    for t in bundle.metadata.targets:
        mod = model.get_submodule(t)
        delta = hand_delta(bundle, t)
        if isinstance(mod, Conv1D):
            delta = delta.t()
        mod.weight.copy_((mod.weight.double() + delta).to(mod.weight.dtype))
    return model


def engine_for(folder: Path, served: str | None = None, **kw: object) -> Engine:
    """An engine over `folder`, float32 unless `dtype` is given: the engine tests compare with
    float32 references at float32 tolerances (the bfloat16 default has its own tests)."""
    kw.setdefault("dtype", "float32")
    return Engine(EngineConfig(model=str(folder), served_model_name=served, num_threads=1, **kw))


def engine_with(folder: Path, served: str, bundles: dict[str, AdapterBundle], **kw: object) -> Engine:
    """`engine_for` with every bundle of `bundles` loaded under its name."""
    engine = engine_for(folder, served, **kw)
    for name, bundle in bundles.items():
        engine.load_adapter(name, bundle)
    return engine


def targets_of(engine: Engine, suffixes: tuple[str, ...]) -> list[str]:
    return [n for n in engine.spec.linear_shapes if n.endswith(suffixes)]


def bundle_for(engine: Engine, suffixes: tuple[str, ...], seed: int, **kw: object) -> AdapterBundle:
    """A random bundle with large enough factors that every adapter visibly changes outputs."""
    kw.setdefault("std", 0.2)
    return random_bundle(engine.spec, targets_of(engine, suffixes), seed=seed, **kw)


def weights_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


class Embedded(NamedTuple):
    embeddings: torch.Tensor  # [n, dim] float32, L2-normalised
    prompt_tokens: int


class Classified(NamedTuple):
    labels: list[str]
    probs: torch.Tensor  # [n, len(label_names)]
    label_names: list[str]
    prompt_tokens: int


def embed(engine: Engine, texts: list[str], adapter: str | None = None) -> Embedded:
    """Embeddings of `texts`, all with `adapter` (None: the base), in one merged encode."""
    return _embedded(engine.encode(texts, [adapter] * len(texts), ["embed"] * len(texts)))


def embed_mixed(engine: Engine, texts: list[str], adapters: list[str | None]) -> Embedded:
    """Row i embedded with adapters[i], in one mixed (unmerged) encode."""
    return _embedded(engine.encode(texts, adapters, ["embed"] * len(texts), mixed=True))


def classify(engine: Engine, texts: list[str], adapter: str) -> Classified:
    """`texts` classified by one sequence-classification adapter, in one merged encode."""
    return _classified(engine.encode(texts, [adapter] * len(texts), ["classify"] * len(texts)))


def classify_mixed(engine: Engine, texts: list[str], adapters: list[str]) -> list[Classified]:
    """Row i classified by adapters[i] (its own head and labels), in one mixed encode; one result per row."""
    return [_classified([r]) for r in engine.encode(texts, adapters, ["classify"] * len(texts), mixed=True)]


def _embedded(rows: list[EncodedRow]) -> Embedded:
    return Embedded(torch.stack([r.embedding for r in rows]), sum(r.prompt_tokens for r in rows))


def _classified(rows: list[EncodedRow]) -> Classified:
    return Classified(
        [r.label for r in rows], torch.stack([r.probs for r in rows]), list(rows[0].label_names or []),
        sum(r.prompt_tokens for r in rows),
    )
