"""CapaBoost adapters: the `capaboost.v1` bundle format, its validation, the merge math,
importers and the registry stores. Nothing here imports Ray."""

from adapters.bundle import FORMAT, AdapterBundle, BundleMetadata, Task, TargetFactors, load_bundle, save_bundle
from adapters.errors import BundleError
from adapters.merge import delta_weight, stacked_factors

__all__ = [
    "FORMAT",
    "AdapterBundle",
    "BundleError",
    "BundleMetadata",
    "Task",
    "TargetFactors",
    "delta_weight",
    "load_bundle",
    "save_bundle",
    "stacked_factors",
]
