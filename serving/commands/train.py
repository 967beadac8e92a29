"""`capaserve train`: train a CapaBoost adapter on a JSONL file and write a bundle.

Only argument parsing and error reporting live here; the loop is
`adapters.training.trainer.train`. torch and transformers are imported when the
command runs, so `capaserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from serving.cli import csv_list

TASKS = ("sequence-classification", "question-answering", "image-classification", "causal-lm", "feature-extraction")


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
    )
    p.add_argument("--model", default=None, help="base model id or folder (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--base-model-id", default=None, help="base_model recorded in the bundle (default: the MiniLM id, else --model)")
    p.add_argument("--task", required=True, choices=TASKS, help="what the adapter is for")
    p.add_argument("--data", required=True, type=Path, help="training JSONL file")
    p.add_argument("--eval", dest="eval_data", default=None, type=Path, help="evaluation JSONL file (default: the training data)")
    p.add_argument("-o", "--output", required=True, type=Path, help="bundle path to write (.safetensors)")
    p.add_argument("--rank", type=int, default=8, help="r, rank of the shared factors (default 8)")
    p.add_argument("--copies", dest="num_copies", type=int, default=2, help="d, number of masked copies (default 2)")
    p.add_argument("--density", type=float, default=0.5, help="mask density in (0, 1] (default 0.5)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scaling is alpha/r (default 16)")
    p.add_argument("--targets", type=csv_list, default=["query", "value"], help="module-name suffixes to adapt (default query,value)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="passes over the data (default 3)")
    length.add_argument("--steps", type=int, default=None, help="optimiser steps instead of epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    p.add_argument(
        "--max-length", type=int, default=None,
        help="tokens per text after truncation (default 128); question-answering: tokens per window "
        "(default the server's, min(384, the model's limit))",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds masks, init, dropout and data order (default 0)")
    p.add_argument(
        "--pooling", choices=("mean", "cls"), default=None,
        help="classification pooling (default mean for text, cls for images)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred: these import torch (~3 s), which `capaserve --help` must not wait for
    from adapters.errors import validation_message
    from adapters.training.config import TrainConfig
    from adapters.training.data import TrainingDataError

    fields = set(TrainConfig.model_fields)
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["progress"] = not args.no_progress
    try:
        cfg = TrainConfig(**values)
    except ValidationError as exc:
        for err in exc.errors():
            flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "arguments"
            print(f"capaserve train: error: {flag}: {validation_message(err)}", file=sys.stderr)
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
