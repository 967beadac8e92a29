"""Importers reproduce the source's own forward pass once merged with adapters.merge.

PEFT: PEFT's model (LoRA layers unmerged) vs a plain transformers model whose target
weights were merged from the imported bundle. Reference checkpoints: a hand-written
unmerged forward `x W^T + (alpha/r) * sum_i x A_i B_i` vs the same merged plain model.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from adapters.bundle import AdapterBundle, Task
from adapters.capaboost_linear import random_masks
from adapters.importers.common import ConversionError, PrefixMap
from adapters.importers.peft import import_peft
from adapters.importers.reference import ReferenceConfig, import_reference
from adapters.merge import delta_weight, merge_into, stacked_factors
from tests.conftest import MINILM_ID

peft = pytest.importorskip("peft")


# ---- helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_dir).eval()


def merged_copy(model: torch.nn.Module, bundle: AdapterBundle) -> torch.nn.Module:
    """A copy of `model` with every bundle target merged by adapters.merge."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for t, f in bundle.targets.items():
            mod = model.get_submodule(t)
            b, a = stacked_factors(f, bundle.metadata.scaling)
            merge_into(mod.weight, mod.weight.detach().clone(), b, a, transposed=isinstance(mod, Conv1D))
    return model


def peft_folder(model: torch.nn.Module, config, folder: Path, seed: int = 0):
    """get_peft_model on a copy, non-zero random lora_B, save_pretrained; returns the PEFT model."""
    from peft import get_peft_model

    pm = get_peft_model(copy.deepcopy(model), config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(folder)
    return pm


def ids(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, vocab, (2, 11), generator=g)
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}


# ---- PEFT -------------------------------------------------------------------------------


def test_peft_minilm_feature_extraction(minilm, tmp_path: Path) -> None:
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], task_type="FEATURE_EXTRACTION")
    pm = peft_folder(minilm, cfg, tmp_path)
    bundle = import_peft(tmp_path, base_model=MINILM_ID)
    m = bundle.metadata
    assert (m.task, m.rank, m.num_copies, m.density, m.base_model) == (Task.FEATURE_EXTRACTION, 4, 1, 1.0, MINILM_ID)
    assert m.scaling == 2.0
    assert "encoder.layer.0.attention.self.query" in m.targets and "pooler.dense" in m.targets
    assert all(bool(f.mask_A.all() and f.mask_B.all()) for f in bundle.targets.values())
    x = ids(minilm.config.vocab_size)
    with torch.no_grad():
        want = pm(**x).last_hidden_state
        got = merged_copy(minilm, bundle)(**x).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want - minilm(**x).last_hidden_state).abs().max() > 1e-3


def test_peft_rslora_with_rank_and_alpha_patterns(minilm, tmp_path: Path) -> None:
    """use_rslora (alpha/sqrt(r)) and per-module r / alpha folded into one bundle exactly."""
    from peft import LoraConfig

    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["query", "value"],
        rank_pattern={"layer.1.attention.self.query": 2},
        alpha_pattern={"value": 32},
        task_type="FEATURE_EXTRACTION",
    )
    pm = peft_folder(minilm, cfg, tmp_path, seed=1)
    bundle = import_peft(tmp_path, base_model=MINILM_ID)
    assert bundle.metadata.rank == 4
    assert bundle.metadata.scaling == pytest.approx(8 / math.sqrt(4))  # the default (r, lora_alpha) one
    assert "patterns" in (bundle.metadata.description or "")
    x = ids(minilm.config.vocab_size, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(
            merged_copy(minilm, bundle)(**x).last_hidden_state, pm(**x).last_hidden_state, atol=1e-5, rtol=1e-5
        )


def test_peft_uniform_rslora_alpha(minilm, tmp_path: Path) -> None:
    from peft import LoraConfig

    peft_folder(minilm, LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["query"]), tmp_path)
    bundle = import_peft(tmp_path, base_model=MINILM_ID, task="feature-extraction")
    assert bundle.metadata.alpha == pytest.approx(8 * 4)  # alpha / r == lora_alpha / sqrt(r)
    assert "patterns" not in (bundle.metadata.description or "")


def test_peft_on_task_model_strips_backbone_prefix(minilm_dir: Path, minilm, tmp_path: Path) -> None:
    """PEFT on BertForSequenceClassification names `bert.encoder...`; AutoModel paths lack `bert.`."""
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification

    task_model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    pm = peft_folder(task_model, LoraConfig(r=4, lora_alpha=4, target_modules=["query", "key"]), tmp_path, seed=2)
    assert any(k.startswith("base_model.model.bert.") for k in load_file(tmp_path / "adapter_model.safetensors"))
    bundle = import_peft(tmp_path, base_model=MINILM_ID, task="feature-extraction")
    assert all(t.startswith("encoder.layer.") for t in bundle.metadata.targets)
    x = ids(minilm.config.vocab_size, seed=2)
    with torch.no_grad():
        want = pm.base_model.model.bert(**x).last_hidden_state
        got = merged_copy(minilm, bundle)(**x).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("arch", "targets", "extra"),
    [
        ("gpt2", ["c_attn", "c_fc", "c_proj"], {"fan_in_fan_out": True}),
        ("llama", ["q_proj", "v_proj", "down_proj"], {"use_rslora": True}),
    ],
)
def test_peft_causal_lm(arch: str, targets: list[str], extra: dict, request, tmp_path: Path) -> None:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(f"tiny_{arch}_dir")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM", **extra)
    pm = peft_folder(model, cfg, tmp_path / "lora", seed=3)
    bundle = import_peft(tmp_path / "lora")
    assert bundle.metadata.task is Task.CAUSAL_LM
    assert bundle.metadata.base_model == str(folder)  # from base_model_name_or_path
    for t, f in bundle.targets.items():
        mod = model.get_submodule(t)  # AutoModelForCausalLM paths, unchanged
        out_f, in_f = (mod.weight.shape[1], mod.weight.shape[0]) if isinstance(mod, Conv1D) else mod.weight.shape
        assert (f.out_features, f.in_features) == (out_f, in_f)
    x = ids(model.config.vocab_size, seed=3)
    with torch.no_grad():
        want = pm(**x).logits
        got = merged_copy(model, bundle)(**x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want - model(**x).logits).abs().max() > 1e-3


@pytest.fixture(scope="module")
def saved_peft(minilm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig

    folder = tmp_path_factory.mktemp("peft-good")
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="FEATURE_EXTRACTION")
    peft_folder(minilm, cfg, folder)
    return folder


def _config(**changes):
    def mutate(folder: Path) -> None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return mutate


def _weights(fn):
    def mutate(folder: Path) -> None:
        path = folder / "adapter_model.safetensors"
        ts = load_file(path)
        fn(ts)
        save_file(ts, path)

    return mutate


def _pickle_only(folder: Path) -> None:
    ts = load_file(folder / "adapter_model.safetensors")
    torch.save(ts, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()


Q0 = "base_model.model.encoder.layer.0.attention.self.query"
PEFT_ERRORS = [
    ("pickle-only", _pickle_only, "never loads pickles"),
    ("no-config", lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
    ("config-not-json", lambda f: (f / "adapter_config.json").write_text("{"), "not JSON"),
    ("not-lora", _config(peft_type="IA3"), "only LORA adapters"),
    ("dora", _config(use_dora=True), "use_dora=True is not supported"),
    ("lora-bias", _config(lora_bias=True), "lora_bias=True is not supported"),
    ("modules-to-save", _config(modules_to_save=["classifier"]), "modules_to_save"),
    ("trained-bias", _config(bias="all"), "bias='all'"),
    ("pissa", _config(init_lora_weights="pissa_niter_4"), "init_lora_weights='pissa_niter_4' changes the base weights"),
    ("seq-cls", _config(task_type="SEQ_CLS"), "no capaboost classification head"),
    ("unknown-task", _config(task_type="TOKEN_CLS"), "has no bundle task"),
    ("no-task", _config(task_type=None), "no task_type"),
    ("no-base", _config(base_model_name_or_path=None), "no base model"),
    ("rank-mismatch", _config(r=3), "adapter_config gives rank 3, weights have 2"),
    ("missing-B", _weights(lambda ts: ts.pop(f"{Q0}.lora_B.weight")), "missing lora_B"),
    ("embedding", _weights(lambda ts: ts.update({"base_model.model.embeddings.word_embeddings.lora_embedding_A": torch.zeros(2, 3)})), "embedding LoRA is not supported"),
    ("dora-vector", _weights(lambda ts: ts.update({f"{Q0}.lora_magnitude_vector": torch.ones(384)})), "DoRA is not supported"),
    ("bad-shape", _weights(lambda ts: ts.update({f"{Q0}.lora_B.weight": torch.zeros(384, 5)})), "expected lora_A [r, in] and lora_B [out, r]"),
    ("nan", _weights(lambda ts: ts[f"{Q0}.lora_A.weight"].view(-1).__setitem__(0, float("nan"))), "holds NaN or Inf"),
    ("int-weight", _weights(lambda ts: ts.update({f"{Q0}.lora_A.weight": ts[f"{Q0}.lora_A.weight"].to(torch.int8)})), "must be floating point"),
    ("empty", _weights(lambda ts: ts.clear() or ts.update({"x": torch.zeros(1)})), "unexpected tensor 'x'"),
    ("adapter-name-kept", _weights(lambda ts: ts.update({f"{Q0}.lora_A.default.weight": torch.zeros(2, 384)})), "unexpected tensor"),
]


@pytest.mark.parametrize(("name", "mutate", "expected"), PEFT_ERRORS, ids=[c[0] for c in PEFT_ERRORS])
def test_peft_rejects(name: str, mutate, expected: str, saved_peft: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "lora"
    shutil.copytree(saved_peft, folder)
    mutate(folder)
    with pytest.raises(ConversionError) as info:
        import_peft(folder, base_model=None if name == "no-base" else MINILM_ID)
    assert expected in str(info.value)


def test_peft_keys_without_peft_model_prefix(saved_peft: Path, tmp_path: Path) -> None:
    """transformers' PEFT integration saves keys without `base_model.model.`; same bundle."""
    import shutil

    folder = tmp_path / "lora"
    shutil.copytree(saved_peft, folder)
    _weights(lambda ts: [ts.update({k.removeprefix("base_model.model."): ts.pop(k)}) for k in list(ts)])(folder)
    a, b = (import_peft(f, base_model=MINILM_ID, description="same") for f in (saved_peft, folder))
    assert a.metadata == b.metadata
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())


# ---- prefix mapping ----------------------------------------------------------------------


def test_prefix_map_rules() -> None:
    fe = PrefixMap.default(Task.FEATURE_EXTRACTION)
    assert fe.apply("bert.encoder.layer.0.output.dense") == "encoder.layer.0.output.dense"
    assert fe.apply("roberta.encoder.layer.0.output.dense") == "encoder.layer.0.output.dense"
    assert fe.apply("encoder.layer.0.output.dense") == "encoder.layer.0.output.dense"
    assert fe.apply("bertish.layer") == "bertish.layer"  # whole first part only
    assert PrefixMap.default(Task.SEQUENCE_CLASSIFICATION) == fe
    causal = PrefixMap.default(Task.CAUSAL_LM)
    assert causal.apply("model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    custom = PrefixMap.parse(["0.auto_model.=", "=model."])
    assert custom.apply("0.auto_model.encoder.x") == "encoder.x"
    assert custom.apply("layers.0.mlp.up_proj") == "model.layers.0.mlp.up_proj"
    with pytest.raises(ConversionError, match="OLD=NEW"):
        PrefixMap.parse(["bert."])
    with pytest.raises(ConversionError, match="both map to"):
        fe.map_all(["bert.encoder.a", "encoder.a"])
    with pytest.raises(ConversionError, match="invalid path"):
        PrefixMap.parse(["bert.pooler.dense="]).map_all(["bert.pooler.dense"])


# ---- reference checkpoints ----------------------------------------------------------------

R, D, ALPHA = 4, 2, 8.0
REF_TARGETS = {  # reference module path -> (in, out) on MiniLM
    "bert.encoder.layer.0.attention.self.query": (384, 384),
    "bert.encoder.layer.0.attention.self.value": (384, 384),
    "bert.encoder.layer.1.intermediate.dense": (384, 1536),
    "bert.encoder.layer.1.output.dense": (1536, 384),
}


def reference_tensors(name: str = "capa", seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """What the reference code saves: d masked copies per factor, A_i [in, r], B_i [r, out]."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {"bert.embeddings.word_embeddings.weight": torch.zeros(3, 4)}  # ignored
    for i, (module, (in_f, out_f)) in enumerate(REF_TARGETS.items()):
        a = torch.randn(in_f, R, generator=g) * 0.1
        b = torch.randn(R, out_f, generator=g) * 0.1
        if i == 0:
            a[0, 0] = 0.0  # a trained exact zero: loses its mask bit, still contributes 0
        ma, mb = random_masks(D, (in_f, R), 0.5, g), random_masks(D, (R, out_f), 0.5, g)
        for c in range(D):
            out[f"{module}.loras.{name}.lora_A.{c}.weight"] = (a * ma[c]).to(dtype)
            out[f"{module}.loras.{name}.lora_B.{c}.weight"] = (b * mb[c]).to(dtype)
    return out


def reference_forward(model, tensors: dict[str, torch.Tensor], x: dict, name: str = "capa") -> torch.Tensor:
    """The reference's unmerged forward: each target adds (alpha/r) * sum_i x A_i B_i (hooks)."""

    def hook_for(module_path: str):
        def hook(mod, inputs, output):
            extra = sum(
                inputs[0]
                @ tensors[f"{module_path}.loras.{name}.lora_A.{c}.weight"].float()
                @ tensors[f"{module_path}.loras.{name}.lora_B.{c}.weight"].float()
                for c in range(D)
            )
            return output + (ALPHA / R) * extra

        return hook

    handles = [
        model.get_submodule(p.removeprefix("bert.")).register_forward_hook(hook_for(p)) for p in REF_TARGETS
    ]
    try:
        with torch.no_grad():
            return model(**x).last_hidden_state
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_reference_import_reproduces_unmerged_forward(fmt: str, minilm, tmp_path: Path) -> None:
    tensors = reference_tensors()
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "safetensors":
        save_file(tensors, path)
    else:
        torch.save(tensors, path)
    bundle = import_reference(
        path, ReferenceConfig(r=R, alpha=ALPHA), base_model=MINILM_ID, task=Task.FEATURE_EXTRACTION
    )
    m = bundle.metadata
    assert (m.rank, m.num_copies, m.alpha, m.base_model) == (R, D, ALPHA, MINILM_ID)
    assert m.targets == [p.removeprefix("bert.") for p in REF_TARGETS]
    assert 0.4 < m.density < 0.6
    # masked shared factors are the stored copies bit for bit, so the merge is exact
    for p in REF_TARGETS:
        f = bundle.targets[p.removeprefix("bert.")]
        for c in range(D):
            assert torch.equal((f.lora_A * f.mask_A[c]).t(), tensors[f"{p}.loras.capa.lora_A.{c}.weight"])
            assert torch.equal((f.lora_B * f.mask_B[c]).t(), tensors[f"{p}.loras.capa.lora_B.{c}.weight"])
        want = (ALPHA / R) * sum(
            (tensors[f"{p}.loras.capa.lora_A.{c}.weight"] @ tensors[f"{p}.loras.capa.lora_B.{c}.weight"]).t()
            for c in range(D)
        )
        torch.testing.assert_close(delta_weight(f, m.scaling), want, atol=1e-6, rtol=1e-5)
    first = bundle.targets["encoder.layer.0.attention.self.query"]
    assert not bool(first.mask_A[:, 0, 0].any())  # the exact zero lost its mask bit
    x = ids(minilm.config.vocab_size, seed=4)
    with torch.no_grad():
        got = merged_copy(minilm, bundle)(**x).last_hidden_state
    torch.testing.assert_close(got, reference_forward(minilm, tensors, x), atol=1e-5, rtol=1e-5)


def test_reference_keeps_half_precision(tmp_path: Path) -> None:
    save_file(reference_tensors(dtype=torch.bfloat16), tmp_path / "c.safetensors")
    bundle = import_reference(
        tmp_path / "c.safetensors", ReferenceConfig(r=R, alpha=ALPHA), base_model=MINILM_ID, task="feature-extraction"
    )
    f = next(iter(bundle.targets.values()))
    assert f.lora_A.dtype == torch.bfloat16 and f.mask_A.dtype == torch.bool


def test_reference_config_sources(tmp_path: Path) -> None:
    cfg_path = tmp_path / "adapter_config.json"
    cfg_path.write_text(json.dumps({"name": "capa", "config": {"r": 4, "alpha": 8, "architecture": "lora"}}))
    cfg = ReferenceConfig.from_sources(cfg_path)
    assert (cfg.r, cfg.alpha, cfg.name) == (4, 8.0, "capa")
    assert ReferenceConfig.from_sources(cfg_path, alpha=2.0, name="other").model_dump()["alpha"] == 2.0
    assert ReferenceConfig.from_sources(alpha=1, rank=2).r == 2
    with pytest.raises(ConversionError, match="needs r"):
        ReferenceConfig.from_sources(alpha=1)
    with pytest.raises(ConversionError, match="finite"):
        ReferenceConfig.from_sources(alpha=float("nan"), rank=2)


def test_reference_state_dict_wrapper_and_name_choice(tmp_path: Path) -> None:
    both = {**reference_tensors("one", seed=1), **reference_tensors("two", seed=2)}
    torch.save({"state_dict": both, "epoch": 3}, tmp_path / "c.pt")
    with pytest.raises(ConversionError, match=r"holds adapters \['one', 'two'\]"):
        import_reference(tmp_path / "c.pt", ReferenceConfig(r=R, alpha=ALPHA), base_model="b", task="feature-extraction")
    bundle = import_reference(
        tmp_path / "c.pt", ReferenceConfig(r=R, alpha=ALPHA, name="two"), base_model="b", task="feature-extraction"
    )
    want = reference_tensors("two", seed=2)["bert.encoder.layer.1.output.dense.loras.two.lora_B.1.weight"]
    f = bundle.targets["encoder.layer.1.output.dense"]
    assert torch.equal((f.lora_B * f.mask_B[1]).t(), want)


class Payload:
    """An object a pickle may carry; weights_only must refuse to rebuild it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_reference_pickle_with_objects_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = {**reference_tensors(), "payload": Payload(marker)}
    torch.save(bad, tmp_path / "evil.bin")
    with pytest.raises(ConversionError, match=r"weights_only"):
        import_reference(tmp_path / "evil.bin", ReferenceConfig(r=R, alpha=ALPHA), base_model="b", task="feature-extraction")
    assert not marker.exists()
    torch.save({**reference_tensors(), "note": "hello"}, tmp_path / "str.bin")  # allowed by weights_only
    with pytest.raises(ConversionError, match="not tensors: note"):
        import_reference(tmp_path / "str.bin", ReferenceConfig(r=R, alpha=ALPHA), base_model="b", task="feature-extraction")


def _ref_case(fn):
    def build(path: Path) -> None:
        ts = reference_tensors()
        fn(ts)
        save_file(ts, path)

    return build


QREF = "bert.encoder.layer.0.attention.self.query.loras.capa"
REF_ERRORS = [
    ("copies-disagree", _ref_case(lambda ts: ts[f"{QREF}.lora_A.1.weight"].add_(ts[f"{QREF}.lora_A.0.weight"] != 0)), "copies disagree"),
    ("wrong-rank", _ref_case(lambda ts: ts.update({f"{QREF}.lora_A.0.weight": torch.ones(384, 3)})), "expected float lora_A.<i> [in, r=4]"),
    ("linear-orientation", _ref_case(lambda ts: ts.update({f"{QREF}.lora_B.0.weight": torch.ones(384, 4)})), "lora_B.0 [384, 4]"),
    ("missing-copy", _ref_case(lambda ts: ts.pop(f"{QREF}.lora_B.1.weight")), "got A [0, 1] and B [0]"),
    ("no-lora", lambda p: save_file({"w": torch.zeros(2)}, p), "no `<module>.loras.<name>.lora_A.<i>.weight`"),
    ("not-safetensors", lambda p: p.write_bytes(b"junk" * 10), "not a valid safetensors file"),
    ("nan", _ref_case(lambda ts: ts[f"{QREF}.lora_B.0.weight"].view(-1).__setitem__(0, float("nan"))), "NaN"),
]


@pytest.mark.parametrize(("name", "build", "expected"), REF_ERRORS, ids=[c[0] for c in REF_ERRORS])
def test_reference_rejects(name: str, build, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    build(path)
    with pytest.raises(ConversionError) as info:
        import_reference(path, ReferenceConfig(r=R, alpha=ALPHA), base_model="b", task="feature-extraction")
    assert expected in str(info.value)
