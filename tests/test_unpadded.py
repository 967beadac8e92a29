"""Unpadded encoder forwards (serving/engine/unpadded.py) against transformers' own padded
forward, and the fused oneDNN post-ops (serving/engine/packed.py `fused_linear`) against float32."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from adapters.bundle import Task
from adapters.precision import COSINE_BOUND
from serving.engine.packed import PackedLinear, fused_linear, fused_projections, pack_linears, packing_applies
from serving.engine.pooling import l2_normalize, mean_pool
from serving.engine.unpadded import ATTENTION_MULTIPLE, attention_views, forward_unpadded, unpadded_applies
from tests.engine_utils import MINILM_ID, bundle_for, embed, embed_mixed, engine_for, hand_merge, plain_model

TEXTS = [
    "a",
    "padding costs every linear layer a row per pad position",
    "the unpadded forward packs real tokens only",
    "short one",
    "and a much longer sentence, so that the batch mixes lengths and most rows carry padding to the longest",
]
needs_packing = pytest.mark.skipif(
    not packing_applies(torch.device("cpu"), torch.bfloat16), reason="this CPU has no oneDNN bfloat16"
)


def _both(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return model(**batch).last_hidden_state, forward_unpadded(model, batch), batch["attention_mask"].bool()


@pytest.mark.parametrize("side", ["right", "left"])
def test_unpadded_forward_equals_transformers_in_float32(minilm_dir, side: str) -> None:
    model = plain_model(minilm_dir, Task.FEATURE_EXTRACTION)
    assert unpadded_applies(model)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True, padding_side=side)
    batches = [
        tok(TEXTS, padding=True, return_tensors="pt"),
        tok(["what is packed?"] * 2, ["real tokens are packed; pads are not", "pairs carry token types"],
            padding=True, return_tensors="pt"),  # question-answering pairs: token type 1 on the context
        tok(["same length", "same length"], padding=True, return_tensors="pt"),  # no padding at all
    ]
    assert batches[1]["token_type_ids"].any() and batches[2]["attention_mask"].all()
    for batch in batches:
        ref, got, mask = _both(model, dict(batch))
        assert got.shape == ref.shape
        torch.testing.assert_close(got[mask], ref[mask], atol=1e-5, rtol=1e-5)
        assert not got[~mask].any()  # pad positions are zeros


@pytest.mark.parametrize("side", ["right", "left"])
def test_attention_groups_texts_by_width(minilm_dir, side: str) -> None:
    """Texts of 3 to ~70 tokens fall into several attention views, each a multiple of 16 wide;
    each text's real tokens, and only those, are keys in its own view row; the forward still
    equals transformers' in float32."""
    model = plain_model(minilm_dir, Task.FEATURE_EXTRACTION)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True, padding_side=side)
    texts = ["a", TEXTS[1], TEXTS[4], " ".join(TEXTS[1:]), "b c", TEXTS[4] + " " + TEXTS[4]]
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    mask = batch["attention_mask"].bool()
    real = mask.reshape(-1).nonzero().squeeze(1)
    views = attention_views(mask, real, spare=5)
    lengths = mask.sum(1).tolist()
    widths = sorted({-(-n // ATTENTION_MULTIPLE) * ATTENTION_MULTIPLE for n in lengths})
    assert [g[2] for g in views.groups] == widths and len(widths) >= 3
    assert views.gather is not None and views.back is not None
    assert views.back[real.numel():].tolist() == [0] * 5  # spare rows read view row 0
    rows_of = {}  # view row -> (group, text slot, column)
    for g, (start, n, width, keys) in enumerate(views.groups):
        assert keys.shape == (n, 1, 1, width)
        for r in range(start, start + n * width):
            rows_of[r] = (g, (r - start) // width, (r - start) % width)
    assert len(rows_of) == views.gather.numel()
    token_text = (real // mask.shape[1]).tolist()
    for t, r in enumerate(views.back[: real.numel()].tolist()):
        g, slot, col = rows_of[r]
        assert views.gather[r] == t  # the view row reads this token back
        keys = views.groups[g][3][slot, 0, 0]
        assert keys[col] and int(keys.sum()) == lengths[token_text[t]]
    ref, got, _ = _both(model, batch)
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-5, rtol=1e-5)


@needs_packing
def test_fused_projections_equal_the_separate_layers_and_follow_writes() -> None:
    """Query, key and value as one matmul give each layer's own output bit for bit on packed
    bfloat16 weights, and an in-place write to any of the weights or biases (a hot swap) is seen
    by the next call: the fused copy is never stale. Unpacked layers run as they are."""
    torch.manual_seed(0)
    mods = tuple(torch.nn.Linear(64, 64).to(torch.bfloat16) for _ in range(3))
    for m in mods:
        pack_linears(m)
    x = torch.randn(13, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(fused_projections(mods, x), torch.cat([m(x) for m in mods], -1))
        mods[1].weight.mul_(-2)  # as the WeightBank writes: in place, same tensor
        assert torch.equal(fused_projections(mods, x), torch.cat([m(x) for m in mods], -1))
        mods[2].bias.add_(1)
        assert torch.equal(fused_projections(mods, x), torch.cat([m(x) for m in mods], -1))
    mixed = tuple(torch.nn.Linear(64, 32, bias=i != 1).to(torch.bfloat16) for i in range(3))  # one without bias
    for m in mixed:
        pack_linears(m)
    with torch.inference_mode():
        assert torch.equal(fused_projections(mixed, x), torch.cat([m(x) for m in mixed], -1))
    plain = tuple(torch.nn.Linear(64, 32) for _ in range(3))  # float32: not packed, no concatenated copy
    xf = torch.randn(5, 64)
    with torch.inference_mode():
        assert torch.equal(fused_projections(plain, xf), torch.cat([m(xf) for m in plain], -1))
    assert not hasattr(plain[0], "_fused")


def test_merged_adapter_embeddings_equal_a_hand_merged_transformers_model(minilm_dir) -> None:
    engine = engine_for(minilm_dir, MINILM_ID)
    assert engine.unpadded
    bundle = bundle_for(engine, ("query", "value", "intermediate.dense", "output.dense"), seed=3)
    engine.load_adapter("u", bundle)
    model = hand_merge(plain_model(minilm_dir, Task.FEATURE_EXTRACTION), bundle)
    batch = dict(engine.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with torch.inference_mode():
        ref = l2_normalize(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]))
    got = embed(engine, TEXTS, "u").embeddings
    torch.testing.assert_close(got, ref.float(), atol=2e-5, rtol=0)
    assert engine.mode == "merged"


def test_mixed_adapter_rows_equal_hand_merged_transformers_models(minilm_dir, monkeypatch) -> None:
    """A mixed batch (two adapters and the base, texts of different lengths, every kind of
    target: query, key, value, both output projections, the GELU's layer) runs unpadded, each
    token getting its own text's update, and every row equals a transformers model with that
    row's adapter merged by hand (the base rows: the plain model)."""
    from serving.engine import encode

    calls: list[str] = []

    def spy(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(engine.mode)
        return forward_unpadded(model, batch)

    monkeypatch.setattr(encode, "forward_unpadded", spy)
    engine = engine_for(minilm_dir, MINILM_ID)
    suffixes = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense")
    bundles = {"p": bundle_for(engine, suffixes, seed=7), "q": bundle_for(engine, suffixes[::2], seed=8)}
    for name, bundle in bundles.items():
        engine.load_adapter(name, bundle)
    adapters = ["p", None, "q", "p", None]
    got = embed_mixed(engine, TEXTS, adapters).embeddings
    assert calls == ["mixed"] and engine.mode == "mixed"
    tok = AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
    for name in ("p", "q", None):
        model = plain_model(minilm_dir, Task.FEATURE_EXTRACTION)
        if name is not None:
            model = hand_merge(model, bundles[name])
        rows = [i for i, a in enumerate(adapters) if a == name]
        batch = dict(tok([TEXTS[i] for i in rows], padding=True, return_tensors="pt"))
        with torch.inference_mode():
            ref = l2_normalize(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]))
        torch.testing.assert_close(got[rows], ref.float(), atol=2e-5, rtol=0)
    assert all(not m._forward_hooks for m in engine.model.modules())  # the hooks lived for one forward


def test_bfloat16_embeddings_stay_within_the_guards_bound(minilm_dir) -> None:
    """The served bfloat16 path (unpadded, with fused post-ops where the weights are packed)
    agrees with transformers' float32 forward as closely as the startup guard requires."""
    engine = engine_for(minilm_dir, MINILM_ID, dtype="bfloat16")
    assert engine.unpadded and engine.dtype == torch.bfloat16
    model = plain_model(minilm_dir, Task.FEATURE_EXTRACTION)
    batch = dict(engine.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with torch.inference_mode():
        ref = l2_normalize(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]))
    got = embed(engine, TEXTS).embeddings
    cos = torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1)
    assert cos.min() >= COSINE_BOUND, cos


@needs_packing
def test_fused_post_ops_round_once_from_float32() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96).to(torch.bfloat16)
    res = torch.nn.Linear(64, 64).to(torch.bfloat16)
    pack_linears(lin)
    pack_linears(res)
    assert type(lin) is PackedLinear
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    other = torch.randn(7, 64, dtype=torch.bfloat16)
    gelu = BertModel(BertConfig(hidden_act="gelu", num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                intermediate_size=64)).encoder.layer[0].intermediate.intermediate_act_fn
    with torch.inference_mode():
        exact_gelu = torch.nn.functional.gelu(torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float()))
        exact_add = torch.nn.functional.linear(x.float(), res.weight.float(), res.bias.float()) + other.float()
        fused_gelu, fused_add = fused_linear(lin, x, act=gelu), fused_linear(res, x, add=other)
        for fused, exact in ((fused_gelu, exact_gelu), (fused_add, exact_add)):
            assert fused.dtype == torch.bfloat16
            # within one bfloat16 rounding of the float32 result (8 significant bits)
            assert ((fused.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
        # an activation oneDNN is not asked to fuse runs after the matmul, as written
        relu = torch.nn.ReLU()
        assert torch.equal(fused_linear(lin, x, act=relu), relu(lin(x)))
    plain = torch.nn.Linear(64, 96)  # not packed (float32): torch's own ops
    xf = torch.randn(3, 64)
    with torch.inference_mode():
        assert torch.equal(fused_linear(plain, xf, act=gelu), gelu(plain(xf)))


def test_unpadded_only_for_bert_encoders(minilm_dir, tiny_llama_dir, tiny_vit_dir) -> None:
    model = plain_model(minilm_dir, Task.FEATURE_EXTRACTION)
    assert unpadded_applies(model)
    assert not unpadded_applies(model.train())
    decoder = BertModel(BertConfig(is_decoder=True, num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                   intermediate_size=64)).eval()
    assert not unpadded_applies(decoder)
    assert not engine_for(tiny_llama_dir).unpadded
    assert not engine_for(tiny_vit_dir).unpadded


def test_token_counts_round_to_few_shapes() -> None:
    """Row counts are bucketed so oneDNN's kernels for them stay cached: every count gets at
    most an eighth more rows (under 8 for small counts), and the counts up to 8,192 share 64 buckets."""
    from serving.engine.unpadded import bucket

    sizes = {t: bucket(t) for t in range(1, 8193)}
    assert all(0 <= b - t <= max(7, t // 8) for t, b in sizes.items())
    assert len(set(sizes.values())) == 64
    assert [bucket(t) for t in (1, 9, 100, 257)] == [8, 16, 104, 288]
