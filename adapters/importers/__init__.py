"""Importers: turn adapters trained elsewhere into `capaboost.v1` bundles.

- `import_peft`: a PEFT LoRA folder (d = 1, all-true masks).
- `import_reference`: a checkpoint of the CapaBoost reference code (d masked copies).

Each returns a validated `AdapterBundle` or raises `ConversionError` listing every problem.
"""

from adapters.importers.common import ENCODER_BACKBONES, ConversionError, PrefixMap
from adapters.importers.peft import import_peft
from adapters.importers.reference import ReferenceConfig, import_reference

__all__ = [
    "ENCODER_BACKBONES",
    "ConversionError",
    "PrefixMap",
    "ReferenceConfig",
    "import_peft",
    "import_reference",
]
