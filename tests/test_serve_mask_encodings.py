"""Packed and seed bundles through real HTTP on real Ray Serve: uploaded, served equal to a
hand merge of the uploaded file (masks decoded by the test's own code), and a bad encoding
refused with 400 listing its problems, leaving the registry unchanged."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save

from adapters.bundle import Task, save_bundle
from adapters.synthetic import random_bundle
from adapters.tasks.model_loader import meta_spec
from tests.conftest import MINILM_ID
from tests.serve_helpers import error_of, running_app
from tests.test_masks import file_parts, hand_merged_embeddings

pytestmark = pytest.mark.ray

TEXTS = ["one bit a mask element", "no mask tensors at all", "x"]


@pytest.fixture(scope="module")
def bundles(minilm_dir, tmp_path_factory) -> dict[str, Path]:
    spec = meta_spec(str(minilm_dir), MINILM_ID, Task.FEATURE_EXTRACTION)
    targets = [n for n in spec.linear_shapes if n.endswith(("attention.self.query", "attention.self.value"))]
    folder = tmp_path_factory.mktemp("encoded")
    packed = random_bundle(spec, targets, rank=8, num_copies=2, seed=21, std=0.1).with_encoding("packed")
    seeded = random_bundle(spec, targets, rank=8, num_copies=4, seed=22, std=0.1, mask_encoding="seed",
                           mask_seed=2**64 - 1, density=0.3)
    return {
        "packed": save_bundle(packed, folder / "packed.safetensors"),
        "seeded": save_bundle(seeded, folder / "seeded.safetensors"),
    }


@pytest.fixture(scope="module")
def base_url(tmp_path_factory) -> str:
    args = {"registry": str(tmp_path_factory.mktemp("registry")), "replicas": 1, "num_cpus": 1,
            "max_batch_size": 8, "batch_wait_ms": 5, "registry_poll_s": 0.3}
    with running_app(args, num_cpus=2) as base:
        yield base


def test_packed_and_seed_bundles_are_served_equal_to_a_hand_merge(base_url, bundles, minilm_dir):
    for name, path in bundles.items():
        r = httpx.put(f"{base_url}/v1/adapters/{name}", content=path.read_bytes(), timeout=60)
        assert r.status_code == 201, r.text
        r = httpx.post(f"{base_url}/v1/embeddings", json={"model": name, "input": TEXTS}, timeout=60)
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        want = hand_merged_embeddings(minilm_dir, path, TEXTS).numpy()
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)
        base = httpx.post(f"{base_url}/v1/embeddings", json={"model": MINILM_ID, "input": TEXTS}, timeout=60).json()
        assert not np.allclose(got, [d["embedding"] for d in base["data"]], atol=1e-3)


def test_bad_encodings_are_400_listing_the_problems_and_store_nothing(base_url, bundles):
    tensors, header = file_parts(bundles["packed"])
    q = "encoder.layer.0.attention.self.query"
    tensors[f"{q}.mask_A"] = tensors[f"{q}.mask_A"][:-3]
    tensors[f"{q}.mask_B"] = torch.ones(2, 384, 8, dtype=torch.bool)
    before = httpx.get(f"{base_url}/v1/adapters", timeout=30).json()
    r = httpx.put(f"{base_url}/v1/adapters/broken", content=save(tensors, metadata=header), timeout=60)
    assert r.status_code == 400, r.text
    message = error_of(r)["message"]
    assert f"tensor '{q}.mask_A': expected shape [768], got [765]" in message
    assert f"tensor '{q}.mask_B': expected shape [768], got [2, 384, 8]" in message
    tensors, header = file_parts(bundles["seeded"])
    header["mask_seed"] = "-5"
    r = httpx.put(f"{base_url}/v1/adapters/broken", content=save(tensors, metadata=header), timeout=60)
    assert r.status_code == 400 and "'mask_seed' must be a decimal integer" in error_of(r)["message"], r.text
    assert httpx.get(f"{base_url}/v1/adapters", timeout=30).json() == before
    assert httpx.get(f"{base_url}/v1/adapters/broken", timeout=30).status_code == 404
