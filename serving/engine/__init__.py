"""The inference engine: one base model, CapaBoost adapters merged into it in place.

Imports without Ray. The package re-exports nothing: import each name from the module
that defines it (`serving.engine.engine.Engine`, `serving.config.EngineConfig`,
`serving.engine.sampling.SamplingParams`), so importing one part never loads the rest
and no import can run in a circle through this file.
"""
