"""`capaserve train`: train a CapaBoost adapter on a JSONL file and write a bundle.

Only argument parsing and error reporting live here; the loop is
`adapters.training.trainer.train`. torch and transformers are imported when the
command runs, so `capaserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from serving.config_sources import ConfigError, add_model_flags, model_from_namespace


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a CapaBoost adapter on JSONL data and write a capaboost.v1 bundle",
        description=(
            "Train a CapaBoost adapter (one shared LoRA pair and d static masks per target layer) "
            "on a frozen base model. Data is JSONL: {text, label} for sequence-classification, "
            "{question, context, answers: {text: [...], answer_start: [...]}} (SQuAD) for question-answering, "
            "{image, label} for image-classification (image: a PNG or JPEG path, relative to the JSONL's folder), "
            "{text} for causal-lm, {anchor, positive} for feature-extraction."
        ),
        lazy_flags=_add_flags,
    )
    p.set_defaults(func=run)


def _add_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; added when `train` is parsed (TrainConfig imports torch)."""
    from adapters.training.config import TrainConfig  # deferred: torch, which `capaserve --help` must not wait for

    add_model_flags(p, TrainConfig)


def run(args: argparse.Namespace) -> int:
    # deferred: these import torch (~3 s), which `capaserve --help` must not wait for
    from adapters.training.config import TrainConfig
    from adapters.training.data import TrainingDataError

    try:
        cfg = model_from_namespace(TrainConfig, args)
    except ConfigError as exc:
        print(f"capaserve train: error: {exc}", file=sys.stderr)
        return 2

    from adapters.training.trainer import train  # deferred: transformers, only once the flags are valid

    try:
        train(cfg)
    except TrainingDataError as exc:
        print("capaserve train: error: bad training data:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except (ValueError, FloatingPointError, OSError) as exc:
        print(f"capaserve train: error: {exc}", file=sys.stderr)
        return 1
    return 0
