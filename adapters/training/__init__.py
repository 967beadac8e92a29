"""Training CapaBoost adapters (`capaserve train`): JSONL data (`data`), the wrapped model
(`model`), the loop (`trainer`). `adapters.training.trainer.train(TrainConfig(...))` runs one
training and writes the bundle.
"""
