"""`capaserve train` and `capaserve loadtest` take one flag per field of their models
(TrainConfig, LoadTestConfig), generated as `serve`'s are; the flags they always had keep
their names, and every default comes from the model."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.bundle import Task
from adapters.training.config import TrainConfig
from loadtest.run import LoadTestConfig
from serving.cli import build_parser
from serving.config_sources import ConfigError, model_from_namespace, model_settings

TRAIN_FLAGS = [
    "--model", "--base-model-id", "--task", "--data", "--eval", "-o", "--output", "--rank", "--copies", "--density",
    "--alpha", "--targets", "--epochs", "--steps", "--lr", "--batch-size", "--max-length", "--seed", "--pooling",
    "--device", "--no-progress",
]
LOADTEST_FLAGS = [
    "--model", "--served-model-name", "--url", "--baseline-url", "--admin-token", "--adapters", "--zipf",
    "--goal-adapters", "--goal-zipf", "--users", "--spawn-rate", "--duration", "--rounds", "--mix",
    "--texts-per-request", "--ingress", "--dtype", "--check-fraction", "--targets", "--adapter-task", "--rank",
    "--num-copies", "--replicas", "--num-cpus", "--max-batch-size", "--batch-wait-ms", "--no-baseline",
    "--no-single", "--seed", "--out", "--no-progress",
]
REQUIRED = {"train": ["--task", "sequence-classification", "--data", "d.jsonl", "-o", "b.safetensors"], "loadtest": []}
MODELS = {"train": TrainConfig, "loadtest": LoadTestConfig}


def _sub(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _parse(command: str, argv: list[str]):
    ns = build_parser().parse_args([command, *argv])
    return model_from_namespace(MODELS[command], ns)


@pytest.mark.parametrize("command", ["train", "loadtest"])
def test_every_field_has_a_flag_that_help_lists(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    sub = _sub(command)
    assert sub.format_help() == text
    options = {o for a in sub._actions for o in a.option_strings}
    dests = {a.dest for a in sub._actions} - {"help"}
    settings = model_settings(MODELS[command])
    assert dests == {s.dest for s in settings} and len(settings) == len(MODELS[command].model_fields)
    for s in settings:
        assert s.flag in options and s.flag in text, s.flag
    old = TRAIN_FLAGS if command == "train" else LOADTEST_FLAGS
    assert [f for f in old if f not in options] == []


@pytest.mark.parametrize("command", ["train", "loadtest"])
def test_unset_flags_take_the_models_defaults(command):
    cfg = _parse(command, REQUIRED[command])
    if command == "train":
        assert cfg == TrainConfig(task=Task.SEQUENCE_CLASSIFICATION, data=Path("d.jsonl"), output=Path("b.safetensors"))
    else:
        assert cfg == LoadTestConfig()


def test_train_flags_reach_their_fields():
    cfg = _parse("train", [*REQUIRED["train"], "--copies", "3", "--eval", "e.jsonl", "--targets", "query, key",
                           "--steps", "5", "--lr", "0.01", "--pooling", "cls", "--no-progress", "--temperature", "0.1"])
    assert (cfg.num_copies, cfg.eval_data, cfg.targets, cfg.steps, cfg.lr) == (3, Path("e.jsonl"), ["query", "key"], 5, 0.01)
    assert cfg.pooling == "cls" and cfg.progress is False and cfg.temperature == 0.1


def test_loadtest_flags_reach_their_fields():
    cfg = _parse("loadtest", ["--duration", "4", "--adapters", "2,3", "--zipf", "0.5", "--no-baseline", "--no-single",
                              "--targets", "attn", "--users", "5"])
    assert (cfg.duration_s, cfg.adapters, cfg.zipf, cfg.baseline, cfg.single) == (4.0, [2, 3], [0.5], False, False)
    assert cfg.targets == "attn" and cfg.users == 5


def test_a_bad_value_names_its_flag(capsys):
    with pytest.raises(ConfigError, match="--copies"):
        _parse("train", [*REQUIRED["train"], "--copies", "0"])
    with pytest.raises(ConfigError, match="arguments: .*epochs or steps"):
        _parse("train", [*REQUIRED["train"], "--epochs", "2", "--steps", "3"])
    with pytest.raises(SystemExit):  # not a number: argparse's usage error, before the model
        build_parser().parse_args(["loadtest", "--users", "many"])
    assert "--users" in capsys.readouterr().err


def test_on_off_flags_read_both_variables(monkeypatch):
    monkeypatch.setenv("CAPASERVE_NO_PROGRESS", "1")
    assert _parse("train", REQUIRED["train"]).progress is False
    monkeypatch.delenv("CAPASERVE_NO_PROGRESS")
    monkeypatch.setenv("CAPASERVE_BASELINE", "false")
    assert _parse("loadtest", []).baseline is False


def test_the_command_line_builds_without_torch():
    """train's flags come from TrainConfig, which imports torch: they are added when `train` is parsed."""
    code = "import sys; from serving.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
