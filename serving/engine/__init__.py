"""The inference engine: one base model, CapaBoost adapters merged into it in place.

Imports without Ray. Names are resolved lazily (PEP 562) so that `serving.errors` can import
`serving.engine.errors` without pulling in torch and transformers, and without a cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DEFAULT_MODEL_ID": "serving.engine.config",
    "EngineConfig": "serving.engine.config",
    "SamplingParams": "serving.engine.config",
    "Engine": "serving.engine.engine",
    "AdapterNotLoaded": "serving.engine.errors",
    "ClassificationOutput": "serving.engine.outputs",
    "EmbeddingOutput": "serving.engine.outputs",
    "EncodedRow": "serving.engine.outputs",
    "EngineStats": "serving.engine.outputs",
    "GenerationDelta": "serving.engine.outputs",
    "GenerationOutput": "serving.engine.outputs",
    "LoadedAdapterInfo": "serving.engine.outputs",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from serving.engine.config import DEFAULT_MODEL_ID, EngineConfig, SamplingParams
    from serving.engine.engine import Engine
    from serving.engine.errors import AdapterNotLoaded
    from serving.engine.outputs import (
        ClassificationOutput,
        EmbeddingOutput,
        EncodedRow,
        EngineStats,
        GenerationDelta,
        GenerationOutput,
        LoadedAdapterInfo,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'serving.engine' has no attribute {name!r}")
