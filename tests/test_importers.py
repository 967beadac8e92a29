"""Importers reproduce the source's own forward pass once merged with adapters.merge.

PEFT: PEFT's model (LoRA layers unmerged) vs a plain transformers model whose target
weights were merged from the imported bundle. Reference checkpoints: a hand-written
unmerged forward `x W^T + (alpha/r) * sum_i x A_i B_i` vs the same merged plain model.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.image_utils import load_image
from transformers.pytorch_utils import Conv1D

from adapters.bundle import AdapterBundle, Task
from adapters.capaboost_linear import random_masks
from adapters.importers.common import ConversionError, PrefixMap
from adapters.importers.peft import import_peft
from adapters.importers.reference import ReferenceConfig, import_reference
from adapters.merge import delta_weight, merge_into, stacked_factors
from tests.conftest import MINILM_ID
from tests.peft_models import peft_folder, qa_peft, seq_cls_peft
from tests.serve_helpers import CAPASERVE

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


# ---- PEFT task heads (modules_to_save) ------------------------------------------------------

SENTENCES = ["a fine day for a walk", "the service was slow and the soup was cold, sadly", "ok"]


def test_peft_seq_cls_packed_and_served_equals_peft(minilm_dir: Path, tmp_path: Path) -> None:
    """SEQ_CLS on BertForSequenceClassification: `capaserve pack peft`, then the engine's
    classify, gives PEFT's own probabilities. BERT's classifier reads the pooler, which the
    LoRA also targets (`dense`): the bundle's head.dense is the base pooler plus its delta."""
    import subprocess

    from transformers import AutoTokenizer

    from adapters.validation import load_bundle
    from tests.engine_utils import classify, engine_with

    id2label = {0: "negative", 1: "neutral", 2: "positive"}
    pm = seq_cls_peft(minilm_dir, tmp_path / "lora", id2label)
    out = tmp_path / "cls.safetensors"
    proc = subprocess.run(
        [CAPASERVE, "pack", "peft", str(tmp_path / "lora"), "-o", str(out), "--base-model", MINILM_ID],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    m = bundle.metadata
    assert (m.task, m.labels, m.pooling) == (Task.SEQUENCE_CLASSIFICATION, list(id2label.values()), "cls")
    assert "pooler.dense" in m.targets and all(t.startswith(("encoder.", "pooler.")) for t in m.targets)
    assert set(bundle.head) == {"head.dense.weight", "head.dense.bias", "head.out.weight", "head.out.bias"}
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    with torch.no_grad():
        want = torch.softmax(pm(**tok(SENTENCES, padding=True, return_tensors="pt")).logits, dim=-1)
    got = classify(engine_with(minilm_dir, MINILM_ID, {"cls": bundle}), SENTENCES, "cls")
    torch.testing.assert_close(got.probs, want, atol=1e-4, rtol=0)
    assert got.labels == [id2label[i] for i in want.argmax(-1).tolist()]
    assert float(want.max() - want.min()) > 0.05  # the head separates the inputs: a real check


def test_peft_question_answering_served_equals_peft_decoded(minilm_dir: Path, tmp_path: Path) -> None:
    """QUESTION_ANS: the engine's answers equal the documented decode over PEFT's own logits.

    PEFT's model with its LoRA layers is called through `get_base_model()`: peft 0.21's
    PeftModelForQuestionAnswering.forward takes `token_type_ids` but does not pass them on,
    so called directly it reads every token as segment 0, unlike the transformers model."""
    from transformers import AutoTokenizer

    from adapters.tasks.qa import QAInput
    from tests.engine_utils import engine_with
    from tests.qa_reference import reference_answer

    pm = qa_peft(minilm_dir, tmp_path)
    bundle = import_peft(tmp_path, base_model=MINILM_ID)
    assert bundle.metadata.task is Task.QUESTION_ANSWERING and set(bundle.head) == {"head.qa.weight", "head.qa.bias"}
    engine = engine_with(minilm_dir, MINILM_ID, {"qa": bundle})
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    context = " ".join(f"Box {i} holds {n} red marbles and sits on shelf {i % 4}." for i, n in enumerate(range(3, 60)))
    asks = [QAInput(question="How many marbles are in box 7?", context=context),
            QAInput(question="Where is the box?", context="The box is on the third shelf.")]
    rows = engine.encode(asks, ["qa"] * len(asks), ["qa"] * len(asks))
    for row, ask in zip(rows, asks):
        want = reference_answer(pm.get_base_model(), tok, ask.question, ask.context)
        assert (row.answer, row.start, row.end) == (want.answer, want.start, want.end)
        assert abs(row.score - want.score) <= 1e-4
    assert len(reference_answer(pm.get_base_model(), tok, asks[0].question, context).windows) >= 2


def test_peft_vit_image_classifier(tiny_vit_dir: Path, tmp_path: Path) -> None:
    """A ViT classifier saved through modules_to_save with no task_type (PEFT has no image
    task): image-classification, `vit.` stripped, the engine's probabilities equal PEFT's."""
    from peft import LoraConfig
    from transformers import AutoImageProcessor, ViTForImageClassification

    from tests.engine_utils import engine_with
    from tests.image_reference import IMAGES

    torch.manual_seed(0)
    model = ViTForImageClassification.from_pretrained(tiny_vit_dir, num_labels=3).eval()
    pm = peft_folder(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       modules_to_save=["classifier"]), tmp_path)
    bundle = import_peft(tmp_path, base_model="tiny/vit")
    m = bundle.metadata
    assert (m.task, m.pooling, m.labels) == (Task.IMAGE_CLASSIFICATION, "cls", ["LABEL_0", "LABEL_1", "LABEL_2"])
    assert m.targets[0] == "layers.0.attention.q_proj" and set(bundle.head) == {"head.out.weight", "head.out.bias"}
    images = [base64.b64decode(u.split(",", 1)[1]) for u in IMAGES]
    rows = engine_with(tiny_vit_dir, "tiny/vit", {"img": bundle}).encode(images, ["img"] * 5, ["classify"] * 5)
    processor = AutoImageProcessor.from_pretrained(tiny_vit_dir)
    pixels = processor(images=[load_image(u) for u in IMAGES], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = torch.softmax(pm(pixel_values=pixels).logits, dim=-1)
    torch.testing.assert_close(torch.stack([r.probs for r in rows]), want, atol=1e-4, rtol=0)


def test_peft_roberta_dense_tanh_head(tmp_path: Path) -> None:
    """RobertaForSequenceClassification's classifier (dense, tanh, out_proj on the first
    token) is the bundle's dense head; checked by hand on the merged RobertaModel."""
    from peft import LoraConfig
    from transformers import AutoModel, RobertaConfig, RobertaForSequenceClassification, RobertaModel

    config = RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=64, pad_token_id=1)
    torch.manual_seed(0)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "base")
    task_model = RobertaForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2).eval()
    pm = peft_folder(task_model, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
                     tmp_path / "lora", seed=5)
    bundle = import_peft(tmp_path / "lora", base_model="tiny-roberta", labels=["no", "yes"])
    assert bundle.metadata.labels == ["no", "yes"] and bundle.metadata.pooling == "cls"
    x = ids(99, seed=5)
    merged = merged_copy(AutoModel.from_pretrained(tmp_path / "base").eval(), bundle)
    h = bundle.head
    with torch.no_grad():
        first = merged(**x).last_hidden_state[:, 0]
        got = torch.tanh(first @ h["head.dense.weight"].t() + h["head.dense.bias"]) @ h["head.out.weight"].t() + h["head.out.bias"]
        want = pm(**x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConversionError, match="3 labels given but the head has 2 outputs"):
        import_peft(tmp_path / "lora", base_model="tiny-roberta", labels=["a", "b", "c"])


def test_peft_bert_classifier_needs_the_base_pooler(minilm_dir: Path, tmp_path: Path) -> None:
    seq_cls_peft(minilm_dir, tmp_path, {0: "a", 1: "b"})
    with pytest.raises(ConversionError, match=r"BERT's classifier reads the base model's pooler .*'no/such/base'"):
        import_peft(tmp_path, base_model=MINILM_ID, base_weights="no/such/base")
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "a"}}))
    with pytest.raises(ConversionError, match="id2label does not name the head's 2 labels"):
        import_peft(tmp_path, base_model=MINILM_ID)
    fe = import_peft(tmp_path, base_model=MINILM_ID, task="feature-extraction")  # asked for: the head is left out
    assert not fe.head and "saved head 'classifier' left out" in (fe.metadata.description or "")


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


def _both(*mutations):
    def mutate(folder: Path) -> None:
        for m in mutations:
            m(folder)

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
    ("other-saved-module", _both(_config(modules_to_save=["LayerNorm"]), _weights(lambda ts: ts.update({"base_model.model.encoder.layer.0.output.LayerNorm.weight": torch.ones(384)}))), "modules_to_save saved 'encoder.layer.0.output.LayerNorm' (weight [384]): a bundle carries no trained module but a task head"),
    ("score-head", _both(_config(modules_to_save=["score"], task_type="SEQ_CLS"), _weights(lambda ts: ts.update({"base_model.model.score.weight": torch.ones(2, 384)}))), "`score` is a decoder's sequence classifier"),
    ("classifier-unknown-backbone", _both(_config(modules_to_save=["classifier"], task_type="SEQ_CLS"), _weights(lambda ts: ts.update({"base_model.model.classifier.weight": torch.ones(2, 384), "base_model.model.classifier.bias": torch.ones(2)}))), "on a model whose backbone prefix is not known cannot be mapped"),
    ("two-heads", _both(_config(modules_to_save=["classifier", "qa_outputs"]), _weights(lambda ts: ts.update({"base_model.model.classifier.weight": torch.ones(2, 384), "base_model.model.qa_outputs.weight": torch.ones(2, 384)}))), "more than one head: ['classifier', 'qa_outputs']"),
    ("qa-head-shape", _both(_config(modules_to_save=["qa_outputs"], task_type="QUESTION_ANS"), _weights(lambda ts: ts.update({"base_model.model.qa_outputs.weight": torch.ones(3, 384), "base_model.model.qa_outputs.bias": torch.ones(3)}))), "is not a question-answering head"),
    ("pooler-without-head", _both(_config(modules_to_save=["pooler"]), _weights(lambda ts: ts.update({"base_model.model.bert.pooler.dense.weight": torch.ones(384, 384), "base_model.model.bert.pooler.dense.bias": torch.ones(384)}))), "saved the pooler but no head"),
    ("qa-without-head", _config(task_type="QUESTION_ANS"), "task question-answering needs its head saved through modules_to_save ('qa_outputs')"),
    ("trained-bias", _config(bias="all"), "bias='all'"),
    ("pissa", _config(init_lora_weights="pissa_niter_4"), "init_lora_weights='pissa_niter_4' changes the base weights"),
    ("seq-cls-without-head", _config(task_type="SEQ_CLS"), "task sequence-classification needs its head saved through modules_to_save ('classifier')"),
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
