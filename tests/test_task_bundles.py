"""Bundles of the question-answering and image-classification tasks (docs/bundle-format.md):
their heads and metadata are checked as strictly as the other tasks', and each is
servable only on a base that takes its kind of input (text for QA, images for ViT)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from adapters.bundle import Task, save_bundle
from adapters.errors import BundleError
from adapters.synthetic import random_bundle
from adapters.tasks.model_loader import detect_modality, meta_spec
from adapters.validation import BaseModelSpec, check_servable, load_bundle
from tests.conftest import MINILM_ID
from tests.test_validation import poke, set_meta, set_tensor

Q = "encoder.layer.0.attention.self.query"
VIT_ID = "tiny/vit"
VIT_Q = "layers.0.attention.q_proj"
VIT_V = "layers.1.attention.v_proj"


@pytest.fixture(scope="module")
def text_spec(minilm_dir: Path) -> BaseModelSpec:
    return meta_spec(str(minilm_dir), MINILM_ID)


@pytest.fixture(scope="module")
def vit_spec(tiny_vit_dir: Path) -> BaseModelSpec:
    return meta_spec(str(tiny_vit_dir), VIT_ID)


@pytest.fixture(scope="module")
def good(text_spec: BaseModelSpec, vit_spec: BaseModelSpec, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("task-bundles")
    bundles = {
        "qa": random_bundle(text_spec, [Q], rank=4, seed=1, task=Task.QUESTION_ANSWERING),
        "image": random_bundle(vit_spec, [VIT_Q, VIT_V], rank=4, seed=2, task=Task.IMAGE_CLASSIFICATION,
                               labels=["cat", "dog", "bird"]),
        "image-dense-mean": random_bundle(vit_spec, [VIT_Q], rank=4, seed=3, task=Task.IMAGE_CLASSIFICATION,
                                          pooling="mean", dense=True),
        "vit-fe": random_bundle(vit_spec, [VIT_Q], rank=4, seed=4),
    }
    return {k: save_bundle(b, folder / f"{k}.safetensors") for k, b in bundles.items()}


def test_specs_say_what_each_base_takes(text_spec: BaseModelSpec, vit_spec: BaseModelSpec, tiny_vit_dir: Path) -> None:
    assert (text_spec.task, text_spec.modality) == (Task.FEATURE_EXTRACTION, "text")
    assert (vit_spec.task, vit_spec.modality, vit_spec.hidden_size) == (Task.FEATURE_EXTRACTION, "image", 32)
    # ViT's modules are named as AutoModel (ViTModel) names them in transformers 5
    assert vit_spec.linear_shapes[VIT_Q] == (32, 32) and vit_spec.linear_shapes["layers.0.mlp.fc1"] == (64, 32)
    assert BaseModelSpec.from_dict(vit_spec.to_dict()) == vit_spec
    # `capaserve pack --check-base` describes the base by the bundle's task: the modality still comes from the folder
    assert meta_spec(str(tiny_vit_dir), VIT_ID, Task.IMAGE_CLASSIFICATION).modality == "image"
    assert detect_modality(type("C", (), {"model_type": "bert"})()) == "text"


def test_good_bundles_load_and_fit_their_base(good: dict[str, Path], text_spec: BaseModelSpec, vit_spec: BaseModelSpec) -> None:
    qa = load_bundle(good["qa"])
    assert qa.metadata.task is Task.QUESTION_ANSWERING and set(qa.head) == {"head.qa.weight", "head.qa.bias"}
    assert qa.metadata.labels is None and qa.metadata.pooling is None
    check_servable(qa, text_spec)
    image = load_bundle(good["image"])
    assert (image.metadata.labels, image.metadata.pooling) == (["cat", "dog", "bird"], "cls")
    assert set(image.head) == {"head.out.weight", "head.out.bias"}  # as ViTForImageClassification: no dense layer
    check_servable(image, vit_spec)
    dense = load_bundle(good["image-dense-mean"])
    assert dense.metadata.pooling == "mean" and "head.dense.weight" in dense.head
    check_servable(dense, vit_spec)
    check_servable(load_bundle(good["vit-fe"]), vit_spec)  # feature extraction is served on either kind of base


@pytest.mark.parametrize(
    ("fixture", "mutate", "expect"),
    [
        ("qa", set_tensor("head.qa.bias", lambda t: None), "missing tensor 'head.qa.bias'"),
        ("qa", set_tensor("head.qa.weight", lambda t: torch.zeros(3, 384)), "'head.qa.weight': expected shape [2, 384], got [3, 384]"),
        ("qa", set_tensor("head.qa.weight", lambda t: torch.zeros(768)), "'head.qa.weight': expected 2-D [2, hidden]"),
        ("qa", set_tensor("head.qa.bias", lambda t: torch.zeros(2, dtype=torch.int64)), "'head.qa.bias': expected a float16"),
        ("qa", set_tensor("head.out.weight", lambda t: torch.zeros(2, 384)), "unexpected tensor 'head.out.weight'"),
        ("qa", poke("head.qa.weight", float("nan")), "'head.qa.weight' holds NaN or Inf"),
        ("qa", set_meta(labels='["a", "b"]', pooling="cls"), "only allowed for task sequence-classification or image-classification"),
        ("image", set_meta(labels=None), "labels is required for task image-classification"),
        ("image", set_meta(pooling=None), "pooling is required for task image-classification"),
        ("image", set_meta(labels='["cat", "dog"]'), "'head.out.weight': expected shape [2, 32]"),
        ("image", set_tensor("head.qa.weight", lambda t: torch.zeros(2, 32)), "unexpected tensor 'head.qa.weight'"),
        ("image", set_tensor("head.out.bias", lambda t: None), "missing tensor 'head.out.bias'"),
        ("vit-fe", set_tensor("head.qa.weight", lambda t: torch.zeros(2, 32)), "unexpected tensor 'head.qa.weight'"),
    ],
)
def test_bad_heads_and_metadata_are_refused(fixture: str, mutate, expect: str, good: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "b.safetensors"
    shutil.copy(good[fixture], path)
    mutate(path)
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    assert expect in str(info.value)


def test_each_task_is_servable_only_on_a_base_of_its_modality(
    good: dict[str, Path], text_spec: BaseModelSpec, vit_spec: BaseModelSpec
) -> None:
    image = load_bundle(good["image"])
    text_vit = BaseModelSpec(VIT_ID, Task.FEATURE_EXTRACTION, 32, vit_spec.linear_shapes, "text")
    with pytest.raises(BundleError, match="needs a base model that takes image input; 'tiny/vit' takes text"):
        check_servable(image, text_vit)
    qa = load_bundle(good["qa"])
    image_minilm = BaseModelSpec(MINILM_ID, Task.FEATURE_EXTRACTION, 384, text_spec.linear_shapes, "image")
    with pytest.raises(BundleError, match="'question-answering' needs a base model that takes text input"):
        check_servable(qa, image_minilm)
    causal = BaseModelSpec(MINILM_ID, Task.CAUSAL_LM, 384, text_spec.linear_shapes)
    with pytest.raises(BundleError, match="'question-answering' cannot be served on a causal-lm base model"):
        check_servable(qa, causal)
    # a QA head whose hidden size is not the base's, and ViT targets named on a text base
    small = BaseModelSpec(MINILM_ID, Task.FEATURE_EXTRACTION, 128, text_spec.linear_shapes)
    with pytest.raises(BundleError, match="head hidden size 384 does not match the base hidden size 128"):
        check_servable(qa, small)
    with pytest.raises(BundleError) as info:
        check_servable(image, text_spec)
    message = str(info.value)
    assert "does not match the served base" in message and f"target '{VIT_Q}' is not a Linear module" in message
