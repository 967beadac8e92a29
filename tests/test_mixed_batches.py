"""Mixed-adapter batches: the unmerged rank-(d*r) path vs each row's merged reference, the
merge/unmerge policy's hysteresis, the scheduler forming mixed batches, and the benchmark."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from adapters.bundle import Task
from serving.engine import Engine
from serving.errors import UnsupportedTask
from tests.engine_utils import MINILM_ID, bundle_for, engine_for, same_weights, weights_snapshot

torch.set_num_threads(1)

TARGETS = ("attention.self.query", "attention.self.value", "intermediate.dense")
TEXTS = [
    "a great movie",
    "the worst film ever made, truly awful in every way",
    "ok",
    "I would watch it again tomorrow",
    "nothing to say",
    "the plot made no sense at all but the music was lovely",
    "fine",
    "a masterpiece",
]


@pytest.fixture(scope="module")
def minilm(minilm_dir) -> Engine:
    probe = engine_for(minilm_dir, MINILM_ID)
    one_dense = sum(f.out_features * f.in_features * 4 for f in bundle_for(probe, TARGETS, seed=0).targets.values())
    del probe
    # room for one adapter's dense deltas: "fx" is dense, every later one keeps factors only
    engine = engine_for(minilm_dir, MINILM_ID, dense_budget_bytes=one_dense)
    engine.load_adapter("fx", bundle_for(engine, TARGETS, seed=1))
    for i, pooling in enumerate(["mean", "cls", "mean"]):
        bundle = bundle_for(
            engine, TARGETS[: 3 - i] or TARGETS, seed=10 + i, task=Task.SEQUENCE_CLASSIFICATION,
            labels=["neg", "neu", "pos"][: 2 + i % 2], pooling=pooling,
        )
        engine.load_adapter(f"clf{i}", bundle)
    return engine


def test_factors_kept_for_dense_and_factor_adapters(minilm: Engine) -> None:
    modes = {i.name: i.mode for i in minilm.list_adapters()}
    assert modes == {"fx": "dense", "clf0": "factors", "clf1": "factors", "clf2": "factors"}
    for name in modes:
        e = minilm._cache.peek(name)
        assert set(e.factors) == set(e.deltas) and all(d.b is not None and d.a is not None for d in e.factors.values())
    fx = minilm._cache.peek("fx")
    factor_bytes = sum(d.nbytes for d in fx.factors.values())
    assert fx.nbytes == sum(d.nbytes for d in fx.deltas.values()) + factor_bytes  # accounted
    clf = minilm._cache.peek("clf0")
    assert clf.factors["encoder.layer.0.attention.self.query"] is clf.deltas["encoder.layer.0.attention.self.query"]


def test_embed_mixed_base_and_three_adapters_equal_merged_reference(minilm: Engine) -> None:
    rows = [None, "fx", "clf0", "clf1", None, "fx", "clf2", "clf0"]
    got = minilm.embed_mixed(TEXTS, rows)
    assert minilm.mode == "mixed"
    for i, (text, name) in enumerate(zip(TEXTS, rows)):
        ref = minilm.embed([text], name).embeddings[0]
        torch.testing.assert_close(got.embeddings[i], ref, atol=1e-4, rtol=0)
    assert minilm.mode == "merged"
    assert got.prompt_tokens == minilm.count_tokens(TEXTS)
    # the adapters visibly differ, so equality above is not vacuous
    assert (minilm.embed([TEXTS[0]], "fx").embeddings - minilm.embed([TEXTS[0]]).embeddings).abs().max() > 1e-3


def test_classify_mixed_each_row_own_head_equals_merged_reference(minilm: Engine) -> None:
    rows = ["clf0", "clf1", "clf2", "clf0", "clf2", "clf1", "clf0", "clf1"]
    got = minilm.classify_mixed(TEXTS, rows)
    assert len(got) == len(TEXTS)
    for out, text, name in zip(got, TEXTS, rows):
        ref = minilm.classify([text], name)
        torch.testing.assert_close(out.probs, ref.probs, atol=1e-4, rtol=0)
        assert out.labels == ref.labels and out.label_names == ref.label_names
    with pytest.raises(UnsupportedTask):
        minilm.classify_mixed(TEXTS[:2], ["clf0", None])
    with pytest.raises(UnsupportedTask):
        minilm.classify_mixed(TEXTS[:2], ["clf0", "fx"])


def test_mixed_forward_leaves_base_weights_bit_exact(minilm: Engine) -> None:
    minilm.activate(None)
    base = weights_snapshot(minilm.model)
    minilm.activate("fx")  # a merged adapter is unmerged (pristine restored) before a mixed forward
    minilm.embed_mixed(TEXTS[:4], ["fx", None, "clf0", "clf1"])
    assert minilm.stats().active_adapter is None
    assert same_weights(minilm.model, base)
    minilm.classify_mixed(TEXTS[:3], ["clf0", "clf1", "clf2"])
    assert same_weights(minilm.model, base)
    assert all(not m._forward_hooks for m in minilm.model.modules())  # hooks live for one forward only


def test_single_adapter_mixed_equals_merged_and_long_batches_chunk(minilm: Engine, monkeypatch) -> None:
    import serving.engine.engine as engine_mod

    monkeypatch.setattr(engine_mod, "ENCODE_CHUNK", 3)  # rows of one adapter split across chunks
    rows = ["fx"] * 5 + [None, "clf2", "fx"]
    got = minilm.embed_mixed(TEXTS, rows).embeddings
    for i in range(len(TEXTS)):
        torch.testing.assert_close(got[i], minilm.embed([TEXTS[i]], rows[i]).embeddings[0], atol=1e-4, rtol=0)
