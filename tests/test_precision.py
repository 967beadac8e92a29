"""`dtype auto`: the hardware decision from given facts and on this host, and the startup
guard that keeps float32 when a bfloat16 base disagrees with it (adapters.precision)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from adapters.device import NATIVE_BF16_CPU_FLAGS, auto_dtype, host_auto_dtype, host_cpu_flags, parse_cpu_flags
from adapters.precision import COSINE_BOUND, PROB_BOUND, agreement, guard, probe_outputs, within_bounds
from serving.config import EngineConfig
from serving.engine.engine import Engine
from tests.conftest import MINILM_ID
from tests.engine_utils import embed
from tests.serve_helpers import in_process_app

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SKYLAKE = frozenset({"fpu", "sse4_2", "avx2", "avx512f", "avx512bw", "avx512_vnni"})
HOST_BF16 = host_auto_dtype(CPU) == torch.bfloat16
needs_bf16_cpu = pytest.mark.skipif(not HOST_BF16, reason="this CPU has no AVX512-BF16 or AMX")


@pytest.mark.parametrize(
    "device,cuda_bf16,flags,want",
    [
        (CPU, False, SKYLAKE, torch.float32),
        (CPU, False, SKYLAKE | {"avx512_bf16"}, torch.bfloat16),  # Cooper Lake, Zen 4
        (CPU, False, SKYLAKE | {"amx_tile", "amx_bf16"}, torch.bfloat16),  # Sapphire Rapids
        (CPU, False, frozenset({"amx_tile", "amx_int8"}), torch.float32),  # AMX without its bf16 part
        (CPU, False, frozenset(), torch.float32),  # no /proc/cpuinfo
        (CUDA, True, frozenset(), torch.bfloat16),  # Ampere and later
        (CUDA, False, SKYLAKE | {"avx512_bf16"}, torch.float32),  # a V100: the host CPU does not count
        (torch.device("mps"), False, SKYLAKE | {"avx512_bf16"}, torch.float32),
    ],
)
def test_auto_dtype_from_given_facts(device, cuda_bf16, flags, want) -> None:
    assert auto_dtype(device, cuda_bf16=cuda_bf16, cpu_flags=frozenset(flags)) == want


def test_cpu_flags_are_read_from_the_flags_line() -> None:
    text = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t\t: sysret_ss_attrs\n"
    assert parse_cpu_flags(text) == {"fpu", "avx2", "avx512_bf16"}
    assert parse_cpu_flags("Features\t: fp asimd bf16\n") == frozenset()  # ARM: float32, see auto_dtype
    assert host_cpu_flags("/nonexistent/cpuinfo") == frozenset()


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="no lscpu")
def test_this_host_decision_matches_lscpu() -> None:
    """The host's decision against lscpu's flags (util-linux reads cpuid, not our parser)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, env={"LC_ALL": "C"}).stdout
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags:")), None)
    if flags is None:
        pytest.skip("lscpu lists no flags here")
    want = torch.bfloat16 if NATIVE_BF16_CPU_FLAGS & set(flags) else torch.float32
    assert host_auto_dtype(CPU) == want


def test_bounds_per_kind() -> None:
    ref = torch.nn.functional.normalize(torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert within_bounds("text", agreement("text", ref, ref + 1e-3))
    far = ref.clone()
    far[2, 1] = torch.roll(far[2, 1], 1)  # one sentence's first-token vector is wrong
    m = agreement("text", ref, far)
    assert m["min_cosine"] < COSINE_BOUND and not within_bounds("text", m)
    probs = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]])
    near = probs + torch.tensor([[[-0.04, 0.04, 0.0], [0.0, 0.0, 0.0]]])
    assert within_bounds("causal-lm", agreement("causal-lm", probs, near))
    moved = probs + torch.tensor([[[-0.06, 0.06, 0.0], [0.0, 0.0, 0.0]]])
    assert agreement("causal-lm", probs, moved)["max_abs_prob_diff"] > PROB_BOUND
    assert not within_bounds("causal-lm", agreement("causal-lm", probs, moved))
    flipped = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.39, 0.41]]])  # argmax moves at position 1, p by <= 0.11
    m = agreement("causal-lm", probs, flipped)
    assert m["argmax_equal"] == 0.0 and not within_bounds("causal-lm", m)


def _shifted_minilm(minilm_dir: Path, out: Path) -> Path:
    """MiniLM whose word embeddings sit on a +1000 offset: the embedding LayerNorm removes it in
    float32, but bfloat16 (8 mantissa bits, a step of 4 at 1000) rounds every token alike."""
    model = AutoModel.from_pretrained(str(minilm_dir), local_files_only=True)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.add_(1000.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True).save_pretrained(out)
    return out


def test_guard_refuses_a_base_that_bfloat16_breaks(minilm_dir: Path, tmp_path: Path) -> None:
    folder = _shifted_minilm(minilm_dir, tmp_path / "shifted")
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    ok, metrics = guard(model, torch.bfloat16, lambda m: probe_outputs(m, "text", tok), "text")
    assert not ok and metrics["min_cosine"] < COSINE_BOUND
    plain = AutoModel.from_pretrained(str(minilm_dir), local_files_only=True).eval()
    ok, metrics = guard(plain, torch.bfloat16, lambda m: probe_outputs(m, "text", tok), "text")
    assert ok and metrics["min_cosine"] >= COSINE_BOUND and next(plain.parameters()).dtype == torch.bfloat16


@needs_bf16_cpu
def test_guard_falls_back_to_float32_at_load(minilm_dir: Path, tmp_path: Path) -> None:
    folder = _shifted_minilm(minilm_dir, tmp_path / "shifted")
    engine = Engine(EngineConfig(model=str(folder), served_model_name="shifted", num_threads=1))
    assert engine.dtype == torch.float32 and engine.precision.dtype == "float32"
    assert engine.precision.requested == "auto" and "disagree" in engine.precision.reason
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())
    assert engine.precision.probe["min_cosine"] < COSINE_BOUND


@needs_bf16_cpu
def test_default_serves_bfloat16_close_to_float32(minilm_dir: Path, tmp_path: Path) -> None:
    """The default engine is bfloat16 here; its embeddings are unit vectors (normalised in
    float32) within the guard's cosine of the float32 engine's; /v1/models says so."""
    low = Engine(EngineConfig(num_threads=1))
    f32 = Engine(EngineConfig(num_threads=1, dtype="float32"))
    assert low.dtype == torch.bfloat16 and low.precision.dtype == "bfloat16"
    assert low.precision.probe["min_cosine"] >= COSINE_BOUND
    assert f32.precision.reason == "set explicitly"
    texts = ["hello world", "A much longer sentence about adapters, replicas and merged weights.", "x"]
    a, b = embed(low, texts).embeddings, embed(f32, texts).embeddings
    assert a.dtype == torch.float32
    np.testing.assert_allclose(a.norm(dim=-1).numpy(), 1.0, atol=1e-4)
    assert torch.nn.functional.cosine_similarity(a.double(), b.double()).min() >= COSINE_BOUND

    app, _, _ = in_process_app(low, registry=str(tmp_path / "reg"))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://capaserve") as c:
            cards = (await c.get("/v1/models")).json()["data"]
            emb = (await c.post("/v1/embeddings", json={"model": MINILM_ID, "input": ["hello world"]})).json()
        return cards, emb

    cards, emb = asyncio.run(main())
    base = cards[0]
    assert base["id"] == MINILM_ID and base["precision"]["dtype"] == "bfloat16"
    assert base["precision"]["requested"] == "auto" and base["precision"]["probe"]["min_cosine"] >= COSINE_BOUND
    vec = np.asarray(emb["data"][0]["embedding"], dtype=np.float64)
    assert abs(float((vec * vec).sum()) - 1.0) < 1e-4


@needs_bf16_cpu
@pytest.mark.parametrize("kind", ["causal-lm", "image"])
def test_guard_on_causal_and_image_bases(kind: str, tiny_llama_dir: Path, tiny_vit_dir: Path) -> None:
    """The loader's verdict on a tiny causal LM and a tiny ViT against the agreement computed
    here by hand from a float32 model and its bfloat16 cast."""
    from transformers import AutoImageProcessor, AutoModelForCausalLM

    from adapters.precision import PROBE_PROMPT, probe_image

    folder = tiny_llama_dir if kind == "causal-lm" else tiny_vit_dir
    engine = Engine(EngineConfig(model=str(folder), served_model_name="tiny", num_threads=1))
    if kind == "causal-lm":
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        ids = tok([PROBE_PROMPT], return_tensors="pt")
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
        with torch.no_grad():
            ref = torch.softmax(model(**ids).logits, -1)
            low = torch.softmax(model.to(torch.bfloat16)(**ids).logits.float(), -1)
        diff = float((ref - low).abs().max())
        ok = torch.equal(ref.argmax(-1), low.argmax(-1)) and diff <= PROB_BOUND
        assert engine.precision.probe["max_abs_prob_diff"] == pytest.approx(diff, abs=1e-6)
    else:
        proc = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        pixels = proc(images=[probe_image()], return_tensors="pt")["pixel_values"]
        model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        with torch.no_grad():
            ref = model(pixel_values=pixels).last_hidden_state.mean(1)
            low = model.to(torch.bfloat16)(pixel_values=pixels.bfloat16()).last_hidden_state.float().mean(1)
        cos = float(torch.nn.functional.cosine_similarity(ref.double(), low.double()).min())
        ok = cos >= COSINE_BOUND
        assert engine.precision.probe["min_cosine"] == pytest.approx(cos, abs=1e-6)
    assert engine.precision.dtype == ("bfloat16" if ok else "float32")
    assert engine.dtype == (torch.bfloat16 if ok else torch.float32)
