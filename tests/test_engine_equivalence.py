"""Adapted forward == unmerged CapaBoostLinear forward == a plain model merged by hand, on
MiniLM, a tiny Llama and a tiny GPT-2 (Conv1D), in dense and in factors mode."""

from __future__ import annotations

import pytest
import torch

from adapters.bundle import Task
from adapters.capaboost_linear import wrap_targets
from tests.engine_utils import MINILM_ID, bundle_for, embed, engine_for, hand_merge, plain_model

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world", "capaboost adapters are merged"]

CASES = {
    "minilm": ("minilm_dir", MINILM_ID, ("attention.self.query", "attention.self.value", "intermediate.dense")),
    "llama": ("tiny_llama_dir", None, ("q_proj", "v_proj", "o_proj", "down_proj")),
    "gpt2": ("tiny_gpt2_dir", None, ("attn.c_attn", "attn.c_proj", "mlp.c_fc")),
}


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
    with torch.inference_mode():
        out = model(**batch)
    return out.logits if task is Task.CAUSAL_LM else out.last_hidden_state


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_equals_unmerged_equals_hand_merged(case: str, request: pytest.FixtureRequest) -> None:
    fixture, served, suffixes = CASES[case]
    folder = request.getfixturevalue(fixture)
    probe = engine_for(folder, served, dense_budget_bytes=0)
    bundle = bundle_for(probe, suffixes, seed=7, std=0.1)
    dense_bytes = sum(f.out_features * f.in_features * 4 for f in bundle.targets.values())
    del probe
    # room for one adapter's dense deltas: built dense; with none, the second is built as factors
    engine = engine_for(folder, served, dense_budget_bytes=dense_bytes)
    assert engine.load_adapter("dense", bundle).mode == "dense"
    engine.residency.cache.dense_budget = 0
    assert engine.load_adapter("factors", bundle).mode == "factors"
    engine.residency.cache.dense_budget = dense_bytes

    batch = dict(engine.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    task = engine.task
    base_ref = _forward(plain_model(folder, task), batch, task)
    hand = _forward(hand_merge(plain_model(folder, task), bundle), batch, task)
    unmerged = _forward(wrap_targets(plain_model(folder, task), bundle.targets, bundle.metadata.alpha), batch, task)
    assert (hand - base_ref).abs().max() > 1e-3, "the adapter must visibly change the output"
    # unmerged sums W x + B'A' x, merged (W + B'A') x: float32 rounding differs by ~1 ulp of the output
    torch.testing.assert_close(unmerged, hand, atol=1e-5, rtol=1e-5)

    for name in ("dense", "factors", None, "factors", "dense"):
        engine.activate(name)
        got = _forward(engine.model, batch, task)
        torch.testing.assert_close(got, base_ref if name is None else hand, atol=1e-5, rtol=0)


def test_embeddings_match_sentence_transformers_and_hand_pooling(minilm_dir) -> None:
    from sentence_transformers import SentenceTransformer

    engine = engine_for(minilm_dir, MINILM_ID)
    out = embed(engine, TEXTS)
    st = SentenceTransformer(str(minilm_dir), device="cpu", local_files_only=True)
    ref = torch.as_tensor(st.encode(TEXTS, convert_to_numpy=True))
    assert out.embeddings.shape == (3, 384) and out.embeddings.dtype == torch.float32
    torch.testing.assert_close(out.embeddings, ref, atol=1e-5, rtol=0)
    assert out.prompt_tokens == engine.count_tokens(TEXTS)

    bundle = bundle_for(engine, ("attention.self.query", "output.dense"), seed=3, std=0.1)
    engine.load_adapter("a", bundle)
    got = embed(engine, TEXTS, "a").embeddings
    batch = dict(engine.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with torch.inference_mode():
        hidden = hand_merge(plain_model(minilm_dir, Task.FEATURE_EXTRACTION), bundle)(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * m).sum(1) / m.sum(1)
    expected = pooled / pooled.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - out.embeddings).abs().max() > 1e-3
