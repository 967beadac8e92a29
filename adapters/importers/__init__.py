"""Importers: turn adapters trained elsewhere into `capaboost.v1` bundles.

- `adapters.importers.peft.import_peft`: a PEFT LoRA folder (d = 1, all-true masks).
- `adapters.importers.reference.import_reference`: a checkpoint of the CapaBoost reference
  code (d masked copies).

Each returns a validated `AdapterBundle` or raises `ConversionError`
(`adapters.importers.common`) listing every problem.
"""
