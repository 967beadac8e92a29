"""Training CapaBoost adapters (`capaserve train`): JSONL data, the wrapped model, the loop.

`adapters.training.trainer.train(TrainConfig(...))` runs one training and writes the bundle.
The CLI imports this package only when `capaserve train` runs (it pulls in torch).
"""

from adapters.training.config import DEFAULT_MODEL_ID, TrainConfig
from adapters.training.data import TrainingDataError, read_jsonl

__all__ = ["DEFAULT_MODEL_ID", "TrainConfig", "TrainingDataError", "read_jsonl"]
