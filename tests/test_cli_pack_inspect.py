"""`capaserve pack` and `capaserve inspect` on real files: the main paths through the installed
console script (a subprocess pays ~2 s of torch import, so there are three), the rest
in-process through `serving.cli.main`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters.capaboost_linear import random_masks
from adapters.validation import load_bundle
from serving.cli import main
from tests.conftest import MINILM_ID
from tests.serve_helpers import CAPASERVE

R, D = 4, 2
QUERY = "encoder.layer.0.attention.self.query"
FFN = "encoder.layer.0.intermediate.dense"


def in_process(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def capaserve(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [CAPASERVE]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def reference_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CapaBoost reference checkpoint (.bin, plain tensor dict) with d = 2 masked copies."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (in_f, out_f) in {f"bert.{QUERY}": (384, 384), f"bert.{FFN}": (384, 1536)}.items():
        a, b = torch.randn(in_f, R, generator=g), torch.randn(R, out_f, generator=g)
        ma, mb = random_masks(D, (in_f, R), 0.5, g), random_masks(D, (R, out_f), 0.5, g)
        for i in range(D):
            tensors[f"{module}.loras.capa.lora_A.{i}.weight"] = a * ma[i]
            tensors[f"{module}.loras.capa.lora_B.{i}.weight"] = b * mb[i]
    path = tmp_path_factory.mktemp("ref") / "pytorch_adapter.bin"
    torch.save(tensors, path)
    return path


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA folder as save_pretrained writes it (config + safetensors)."""
    folder = tmp_path_factory.mktemp("peft")
    g = torch.Generator().manual_seed(1)
    key = f"base_model.model.{QUERY}"
    save_file(
        {f"{key}.lora_A.weight": torch.randn(R, 384, generator=g), f"{key}.lora_B.weight": torch.randn(384, R, generator=g)},
        folder / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    config = {"peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "r": R, "lora_alpha": 8,
              "target_modules": ["query"], "base_model_name_or_path": MINILM_ID, "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_pack_reference_then_inspect(reference_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "capa.safetensors"
    res = capaserve(
        "pack", "reference", reference_ckpt, "--alpha", "8", "--rank", R, "--base-model", MINILM_ID,
        "--task", "feature-extraction", "-o", out,
    )
    assert res.returncode == 0, res.stderr
    assert "2 targets, rank 4, 2 copies" in res.stdout
    bundle = load_bundle(out)
    assert bundle.metadata.targets == [QUERY, FFN] and bundle.metadata.num_copies == D

    table = capaserve("inspect", out)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line.strip().startswith("encoder.")}
    assert rows[QUERY][-2:] == [str(D * R), str(D * R)]  # rank(dW) above r: 8 of a possible 8
    assert rows[FFN][1:4] == ["1536", "x", "384"]
    assert "2 above r" in table.stdout and MINILM_ID in table.stdout

    rc, stdout, _ = in_process(capsys, "inspect", out, "--json")
    info = json.loads(stdout)
    assert rc == 0 and info["size_bytes"] == out.stat().st_size and len(info["sha256"]) == 64
    assert info["metadata"]["num_copies"] == D and info["metadata"]["alpha"] == 8.0
    assert {t["name"]: t["delta_rank"] for t in info["targets"]} == {QUERY: D * R, FFN: D * R}


def test_pack_peft_then_inspect_json(peft_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "lora.safetensors"
    res = capaserve("pack", "peft", peft_dir, "-o", out, "--description", "from the test")
    assert res.returncode == 0, res.stderr
    rc, stdout, _ = in_process(capsys, "inspect", out, "--json")
    info = json.loads(stdout)
    assert info["metadata"]["base_model"] == MINILM_ID
    assert info["metadata"]["description"] == "from the test"
    assert info["targets"] == [
        {"name": QUERY, "out_features": 384, "in_features": 384, "dtype": "float32", "mask_density": 1.0,
         "delta_rank": R, "max_rank": R}
    ]


def test_check_base_and_prefix_map(reference_ckpt: Path, minilm_dir: Path, tmp_path: Path, capsys) -> None:
    common = ["pack", "reference", reference_ckpt, "--alpha", "8", "--rank", R, "--base-model", MINILM_ID,
              "--task", "feature-extraction", "--check-base", minilm_dir]
    rc, _, err = in_process(capsys, *common, "-o", tmp_path / "ok.safetensors")
    assert rc == 0, err
    rc, _, err = in_process(capsys, *common, "--prefix-map", "bert.=bert.", "-o", tmp_path / "no.safetensors")
    assert rc == 1 and f"target 'bert.{QUERY}' is not a Linear module" in err and f"bert.{FFN}" in err
    assert not (tmp_path / "no.safetensors").exists()


def test_errors_exit_1_with_every_problem(peft_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(peft_dir, bad)
    (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    rc, _, err = in_process(capsys, "pack", "peft", bad, "-o", tmp_path / "x.safetensors")
    assert rc == 1 and "never loads pickles" in err
    assert not (tmp_path / "x.safetensors").exists()

    rc, _, err = in_process(capsys, "pack", "reference", bad / "adapter_model.bin", "--base-model", "b",
                            "--task", "causal-lm", "-o", tmp_path / "x.safetensors")
    assert rc == 1 and "needs r and alpha" in err

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a bundle")
    rc, _, err = in_process(capsys, "inspect", junk)
    assert rc == 1 and "not a valid safetensors file" in err
    rc, _, err = in_process(capsys, "inspect", tmp_path / "missing.safetensors")
    assert rc == 1 and "no such file" in err


def _reference_from_seed(path: Path, mask_seed: int) -> Path:
    """A reference checkpoint whose masks are the bundle format's seed generator's (density 0.5)."""
    from adapters.masks import seed_mask

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(384, R, generator=g), torch.randn(R, 384, generator=g)
    # the reference layout is [in, r] / [r, out]: the transposes of the bundle's [d, r, in] / [d, out, r]
    ma = seed_mask(mask_seed, QUERY, "A", (D, R, 384), 0.5).transpose(1, 2)
    mb = seed_mask(mask_seed, QUERY, "B", (D, 384, R), 0.5).transpose(1, 2)
    tensors = {}
    for i in range(D):
        tensors[f"bert.{QUERY}.loras.capa.lora_A.{i}.weight"] = a * ma[i]
        tensors[f"bert.{QUERY}.loras.capa.lora_B.{i}.weight"] = b * mb[i]
    torch.save(tensors, path)
    return path


def test_pack_picks_the_smallest_exact_mask_encoding(reference_ckpt: Path, peft_dir: Path, tmp_path: Path, capsys) -> None:
    ref = ["pack", "reference", reference_ckpt, "--alpha", "8", "--rank", R, "--base-model", MINILM_ID,
           "--task", "feature-extraction"]
    rc, out, err = in_process(capsys, *ref, "-o", tmp_path / "ref.safetensors")
    assert rc == 0 and "masks packed" in out, err
    dense = load_bundle(tmp_path / "ref.safetensors")
    rc, out, err = in_process(capsys, *ref, "--mask-encoding", "dense", "-o", tmp_path / "ref-dense.safetensors")
    assert rc == 0 and "masks dense" in out, err
    for t, f in load_bundle(tmp_path / "ref-dense.safetensors").targets.items():
        assert torch.equal(f.mask_A, dense.targets[t].mask_A) and torch.equal(f.mask_B, dense.targets[t].mask_B)
    assert (tmp_path / "ref.safetensors").stat().st_size < (tmp_path / "ref-dense.safetensors").stat().st_size

    # torch-drawn masks cannot be a seed bundle: a clear error, nothing written
    rc, _, err = in_process(capsys, *ref, "--mask-encoding", "seed", "-o", tmp_path / "no.safetensors")
    assert rc == 1 and "--mask-encoding seed needs --mask-seed" in err
    rc, _, err = in_process(capsys, *ref, "--mask-encoding", "seed", "--mask-seed", "7", "-o", tmp_path / "no.safetensors")
    assert rc == 1 and "needs the masks that mask_seed 7 and density" in err and "differ" in err
    assert not (tmp_path / "no.safetensors").exists()

    # masks that are the generator's for a known seed become a seed bundle
    seeded = _reference_from_seed(tmp_path / "seeded.bin", 99)
    rc, out, err = in_process(capsys, "pack", "reference", seeded, "--alpha", "8", "--rank", R, "--density", "0.5",
                              "--base-model", MINILM_ID, "--task", "feature-extraction", "--mask-seed", "99",
                              "-o", tmp_path / "seeded.safetensors")
    assert rc == 0 and "masks seed (mask_seed 99)" in out, err
    assert load_bundle(tmp_path / "seeded.safetensors").metadata.mask_seed == 99

    # a PEFT LoRA's all-true masks are any seed's at density 1
    rc, out, err = in_process(capsys, "pack", "peft", peft_dir, "-o", tmp_path / "lora.safetensors")
    assert rc == 0 and "masks seed (mask_seed 0)" in out, err
    rc, stdout, _ = in_process(capsys, "inspect", tmp_path / "lora.safetensors", "--json")
    info = json.loads(stdout)
    assert info["mask_encoding"] == "seed" and info["mask_bytes"] == 0
    assert info["dense_mask_bytes"] == info["mask_bytes_saved"] == R * 384 * 2
    rc, table, _ = in_process(capsys, "inspect", tmp_path / "ref.safetensors")
    n = D * R * (384 + 384) + D * R * (384 + 1536)
    assert f"masks        packed: {n // 8} bytes, {n - n // 8} saved vs {n} as bool masks" in table
