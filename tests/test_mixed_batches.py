"""Mixed-adapter batches: the unmerged rank-(d*r) path vs each row's merged reference, the
merge/unmerge policy's hysteresis, the scheduler forming mixed batches, and the benchmark."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from adapters.bundle import Task
from adapters.tasks.errors import InvalidRequest, UnsupportedTask
from serving.config_sources import config_of
from serving.engine.engine import Engine
from tests.engine_utils import (
    MINILM_ID,
    bundle_for,
    classify,
    classify_mixed,
    embed,
    embed_mixed,
    engine_for,
    same_weights,
    weights_snapshot,
)

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
    # room for one adapter's dense deltas: "fx" is built dense, the others (loaded while the
    # dense budget is 0) as factors only
    engine = engine_for(minilm_dir, MINILM_ID, dense_budget_bytes=one_dense)
    engine.load_adapter("fx", bundle_for(engine, TARGETS, seed=1))
    engine.residency.cache.dense_budget = 0
    for i, pooling in enumerate(["mean", "cls", "mean"]):
        bundle = bundle_for(
            engine, TARGETS[: 3 - i] or TARGETS, seed=10 + i, task=Task.SEQUENCE_CLASSIFICATION,
            labels=["neg", "neu", "pos"][: 2 + i % 2], pooling=pooling,
        )
        engine.load_adapter(f"clf{i}", bundle)
    engine.residency.cache.dense_budget = one_dense
    return engine


def test_factors_kept_for_dense_and_factor_adapters(minilm: Engine) -> None:
    modes = {i.name: i.mode for i in minilm.list_adapters()}
    assert modes == {"fx": "dense", "clf0": "factors", "clf1": "factors", "clf2": "factors"}
    cache = minilm.residency.cache
    for name in modes:
        b = cache.build(cache.peek(name))
        assert set(b.factors) == set(b.deltas) and all(d.b is not None and d.a is not None for d in b.factors.values())
    fx = cache.peek("fx")
    built = cache.build(fx, merged=True)
    factor_bytes = sum(d.nbytes for d in built.factors.values())
    assert built.nbytes == sum(d.nbytes for d in built.deltas.values()) + factor_bytes  # accounted
    assert fx.nbytes == fx.held_nbytes + built.nbytes
    clf = cache.build(cache.peek("clf0"))
    assert clf.factors["encoder.layer.0.attention.self.query"] is clf.deltas["encoder.layer.0.attention.self.query"]


def test_embed_mixed_base_and_three_adapters_equal_merged_reference(minilm: Engine) -> None:
    rows = [None, "fx", "clf0", "clf1", None, "fx", "clf2", "clf0"]
    got = embed_mixed(minilm, TEXTS, rows)
    assert minilm.mode == "mixed"
    for i, (text, name) in enumerate(zip(TEXTS, rows)):
        ref = embed(minilm, [text], name).embeddings[0]
        torch.testing.assert_close(got.embeddings[i], ref, atol=1e-4, rtol=0)
    assert minilm.mode == "merged"
    assert got.prompt_tokens == minilm.count_tokens(TEXTS)
    # the adapters visibly differ, so equality above is not vacuous
    assert (embed(minilm, [TEXTS[0]], "fx").embeddings - embed(minilm, [TEXTS[0]]).embeddings).abs().max() > 1e-3


def test_classify_mixed_each_row_own_head_equals_merged_reference(minilm: Engine) -> None:
    rows = ["clf0", "clf1", "clf2", "clf0", "clf2", "clf1", "clf0", "clf1"]
    got = classify_mixed(minilm, TEXTS, rows)
    assert len(got) == len(TEXTS)
    for out, text, name in zip(got, TEXTS, rows):
        ref = classify(minilm, [text], name)
        torch.testing.assert_close(out.probs, ref.probs, atol=1e-4, rtol=0)
        assert out.labels == ref.labels and out.label_names == ref.label_names
    with pytest.raises(UnsupportedTask):
        classify_mixed(minilm, TEXTS[:2], ["clf0", None])
    with pytest.raises(UnsupportedTask):
        classify_mixed(minilm, TEXTS[:2], ["clf0", "fx"])


def test_mixed_forward_leaves_base_weights_bit_exact(minilm: Engine) -> None:
    minilm.activate(None)
    base = weights_snapshot(minilm.model)
    minilm.activate("fx")  # a merged adapter is unmerged (pristine restored) before a mixed forward
    embed_mixed(minilm, TEXTS[:4], ["fx", None, "clf0", "clf1"])
    assert minilm.stats().active_adapter is None
    assert same_weights(minilm.model, base)
    classify_mixed(minilm, TEXTS[:3], ["clf0", "clf1", "clf2"])
    assert same_weights(minilm.model, base)
    assert all(not m._forward_hooks for m in minilm.model.modules())  # hooks live for one forward only


def test_single_adapter_mixed_equals_merged_and_long_batches_chunk(minilm: Engine, monkeypatch) -> None:
    import serving.engine.encode as encode_mod

    monkeypatch.setattr(encode_mod, "ENCODE_CHUNK", 3)  # rows of one adapter split across chunks
    rows = ["fx"] * 5 + [None, "clf2", "fx"]
    got = embed_mixed(minilm, TEXTS, rows).embeddings
    for i in range(len(TEXTS)):
        torch.testing.assert_close(got[i], embed(minilm, [TEXTS[i]], rows[i]).embeddings[0], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- policy

from serving.mode_policy import ModePolicy, ModePolicyConfig  # noqa: E402

#: (waiting per adapter, seconds since start, mode after deciding), applied in order:
#: K=3 distinct to enter, top share < 0.5 to enter, > 0.8 to leave, 100 ms dwell.
HYSTERESIS = [
    ({"a": 9}, 0.0, "merged"),  # one adapter: merged
    ({"a": 4, "b": 3}, 0.2, "merged"),  # two adapters: below K
    ({"a": 5, "b": 3, "c": 2}, 0.4, "merged"),  # top share 0.5: not below X
    ({"a": 4, "b": 3, None: 2}, 0.6, "mixed"),  # 3 distinct (base counts), top 0.44 < X: enter
    ({"a": 7, "b": 2, "c": 1}, 0.65, "mixed"),  # top 0.7: between X and Y, stays mixed
    ({"a": 9, "b": 1}, 0.68, "mixed"),  # top 0.9 > Y, but within the dwell time
    ({"a": 9, "b": 1}, 0.75, "merged"),  # dwell over: leave
    ({"a": 2, "b": 2, "c": 2}, 0.8, "merged"),  # would enter, but within the dwell time
    ({}, 0.9, "merged"),  # empty queue: keep the mode
    ({"a": 2, "b": 2, "c": 2}, 1.0, "mixed"),  # enter
    ({"a": 6, "b": 3}, 1.2, "mixed"),  # 2 distinct, top 0.67 <= Y: stays mixed (hysteresis)
    ({"b": 3}, 1.4, "merged"),  # one adapter left: leave
]


def test_policy_hysteresis_table() -> None:
    policy = ModePolicy(ModePolicyConfig(enter_min_adapters=3, enter_top_share=0.5, leave_top_share=0.8, min_dwell_ms=100))
    got = [policy.decide(waiting, now) for waiting, now, _ in HYSTERESIS]
    assert got == [mode for _, _, mode in HYSTERESIS]
    assert policy.switches == 4


def test_policy_config_rejects_leave_below_enter() -> None:
    with pytest.raises(ValueError, match="leave_top_share"):
        ModePolicyConfig(enter_top_share=0.6, leave_top_share=0.5)


# ---------------------------------------------------------------------------- scheduler

from serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402


class MixedRecorder:
    """Echoes (adapter, text) and records each call as ("merged"|"mixed", adapters, texts)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list, list[str]]] = []

    def run_batch(self, kinds, adapter, texts):
        time.sleep(0.01)
        self.calls.append(("merged", [adapter] * len(texts), list(texts)))
        return [(adapter, t) for t in texts]

    def run_mixed_batch(self, kinds, adapters, texts):
        time.sleep(0.01)
        self.calls.append(("mixed", list(adapters), list(texts)))
        return [(a, t) for a, t in zip(adapters, texts)]


class KindRecorder:
    """Echoes (kind, text) per row and records each engine call's rows."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, str]]] = []

    def run_batch(self, kinds, adapter, texts):
        time.sleep(0.01)
        self.calls.append(list(zip(kinds, texts)))
        return list(zip(kinds, texts))


def _drive(mode: str, reqs: list[tuple[str | None, str]]):
    rec = MixedRecorder()

    async def main():
        cfg = SchedulerConfig(
            max_batch_size=8, batch_wait_ms=30, adapter_mode=mode, mode_policy=ModePolicyConfig(min_dwell_ms=0)
        )
        s = Scheduler(rec, cfg)
        outs = await asyncio.gather(*(s.submit("embed", a, [t]) for a, t in reqs))
        await s.close()
        return outs, s.stats()

    outs, stats = asyncio.run(main())
    for (a, t), (res, _) in zip(reqs, outs):
        assert res == [(a, t)]  # every request gets its own adapter's result
    return rec, stats


def test_scheduler_forms_mixed_batches_when_many_adapters_wait() -> None:
    reqs = [([None, "a", "b", "c", "d"][i % 5], f"t{i}") for i in range(16)]
    rec, stats = _drive("adaptive", reqs)
    mixed = [c for c in rec.calls if c[0] == "mixed"]
    assert mixed and len(set(mixed[0][1])) >= 3  # one call, several adapters and the base
    assert len(rec.calls) <= 3 and stats.mixed_batches == len(mixed) and stats.mode_switches >= 1
    merged_rec, merged_stats = _drive("merged", reqs)
    assert all(c[0] == "merged" and len(set(c[1])) == 1 for c in merged_rec.calls)
    assert len(merged_rec.calls) >= 5 and merged_stats.mixed_batches == 0 and merged_stats.mode_switches == 0


def test_scheduler_stays_merged_when_one_adapter_dominates() -> None:
    reqs = [("a" if i % 8 else "b", f"t{i}") for i in range(16)]
    rec, stats = _drive("adaptive", reqs)
    assert all(c[0] == "merged" for c in rec.calls) and stats.mode == "merged" and stats.mode_switches == 0


def test_model_server_mixed_batch_through_scheduler_equals_merged(minilm: Engine, tmp_path) -> None:
    """The deployment's runner in adaptive mode: mixed batches give each request's merged answer."""
    from serving.deployments import ModelServer
    from serving.metrics import ServerMetrics

    server = ModelServer(config_of(registry=str(tmp_path), adapter_mode="adaptive", batch_wait_ms=50.0), engine=minilm)
    server.scheduler._policy.config = ModePolicyConfig(min_dwell_ms=0)
    rows = [None, "fx", "clf0", "clf1", "clf2", "fx", None, "clf0"]

    async def main():
        embeds = await asyncio.gather(*(server.scheduler.submit("embed", a, [t]) for a, t in zip(rows, TEXTS)))
        clfs = await asyncio.gather(
            *(server.scheduler.submit("classify", a, [t]) for a, t in zip(rows[2:5], TEXTS[2:5]))
        )
        report = server.report()
        await server.scheduler.close()
        return embeds, clfs, report

    embeds, clfs, report = asyncio.run(main())
    assert server.scheduler.stats().mixed_batches >= 1
    for (out, _), a, t in zip(embeds, rows, TEXTS):
        torch.testing.assert_close(torch.tensor(out[0][0]), embed(minilm, [t], a).embeddings[0], atol=1e-4, rtol=0)
    for (out, _), a, t in zip(clfs, rows[2:5], TEXTS[2:5]):
        torch.testing.assert_close(torch.tensor(out[0][0].probs), classify(minilm, [t], a).probs[0], atol=1e-4, rtol=0)
    assert report.mode_switches >= 1
    metrics = ServerMetrics()
    metrics.apply(report)
    text = metrics.render().decode()
    assert f'capaserve_adapter_mode{{mode="{report.adapter_mode}",replica="local"}} 1.0' in text
    assert "capaserve_adapter_mode_switches_total" in text


def test_bench_mixed_quick(tmp_path) -> None:
    """loadtest/bench_mixed.py keeps working: its --quick run writes the table."""
    from loadtest.bench_mixed import main

    threads = torch.get_num_threads()
    out = tmp_path / "mixed.md"
    try:
        assert main(["--quick", "--requests", "16", "--clients", "8", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert "| N | Zipf s | merged req/s | adaptive req/s |" in text
    assert text.count("x** |") == 2  # N=1 and N=10


# ---------------------------------------------------------------------------- generation

from serving.engine.sampling import SamplingParams  # noqa: E402

LM_TARGETS = {"llama": ("q_proj", "v_proj", "up_proj"), "gpt2": ("c_attn", "c_fc")}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_mixed_greedy_rows_equal_merged_single_adapter(arch: str, request, tmp_path) -> None:
    folder = request.getfixturevalue(f"tiny_{arch}_dir")
    engine = engine_for(folder)
    engine.load_adapter("x", bundle_for(engine, LM_TARGETS[arch], seed=21, std=0.5))
    engine.load_adapter("y", bundle_for(engine, LM_TARGETS[arch][:1], seed=22, std=0.5))
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    prompts = ["the quick brown fox", "hello", "a b c d e f", "once upon"]
    rows = ["x", None, "y", "x"]
    engine.activate(None)
    base = weights_snapshot(engine.model)
    got = engine.generate_mixed(prompts, rows, greedy)
    assert same_weights(engine.model, base)
    refs = [engine.generate([p], a, greedy)[0] for p, a in zip(prompts, rows)]
    assert [o.token_ids for o in got] == [r.token_ids for r in refs]
    assert len({tuple(r.token_ids) for r in refs[:3]}) > 1  # the adapters change the completions
    with pytest.raises(InvalidRequest, match="prompt 2 has"):  # rows run in adapter order, errors keep the caller's
        engine.generate_mixed(["a", "b", "word " * engine.max_len], ["x", None, "x"], greedy)

    # and through the deployment's scheduler (the continuous decode loop, mixed rows unmerged): same completions
    from serving.deployments import ModelServer

    server = ModelServer(config_of(registry=str(tmp_path), adapter_mode="adaptive", batch_wait_ms=50.0), engine=engine)
    server.scheduler._policy.config = ModePolicyConfig(enter_top_share=0.6, min_dwell_ms=0)

    async def main():
        outs = await asyncio.gather(
            *(server.scheduler.submit("generate", a, [p], params=greedy) for p, a in zip(prompts, rows))
        )
        await server.scheduler.close()
        return outs

    outs = asyncio.run(main())
    assert server.scheduler.stats().requests == 4 and server.scheduler.stats().running_sequences == 0
    assert [o[0][0][0].text for o in outs] == [r.text for r in refs]


def test_encode_shares_one_forward_between_embed_and_classify_rows(minilm: Engine) -> None:
    """Embedding and classify rows in one encode call equal the per-endpoint answers,
    merged (one adapter) and mixed (several adapters and the base)."""
    tasks = ["embed", "classify", "classify", "embed", "classify", "embed", "embed", "classify"]
    merged = minilm.encode(TEXTS, ["clf1"] * len(TEXTS), tasks)
    assert minilm.mode == "merged"
    rows = [None, "clf0", "clf1", "fx", "clf2", "clf0", "fx", "clf0"]
    mixed = minilm.encode(TEXTS, rows, tasks, mixed=True)
    assert minilm.mode == "mixed"
    for got, names in ((merged, ["clf1"] * len(TEXTS)), (mixed, rows)):
        assert [r.task for r in got] == tasks
        for r, text, task, name in zip(got, TEXTS, tasks, names):
            assert r.prompt_tokens == minilm.count_tokens([text])
            if task == "embed":
                ref = embed(minilm, [text], name).embeddings[0]
                torch.testing.assert_close(r.embedding, ref, atol=1e-4, rtol=0)
                assert r.probs is None
            else:
                ref = classify(minilm, [text], name)
                torch.testing.assert_close(r.probs, ref.probs[0], atol=1e-4, rtol=0)
                assert [r.label] == ref.labels and r.label_names == ref.label_names and r.embedding is None
    with pytest.raises(InvalidRequest):
        minilm.encode(TEXTS[:2], ["clf0", "clf1"], ["embed", "embed"])  # two adapters need mixed=True
    with pytest.raises(UnsupportedTask):
        minilm.encode(TEXTS[:2], ["fx", "fx"], ["embed", "classify"])  # fx has no head
    with pytest.raises(InvalidRequest):
        minilm.encode(TEXTS[:2], ["fx", "fx"], ["embed", "generate"])


def test_scheduler_batches_embed_classify_and_qa_rows_in_one_call() -> None:
    rec = KindRecorder()

    async def main():
        s = Scheduler(rec, SchedulerConfig(max_batch_size=8, batch_wait_ms=30))
        reqs = [("embed", "e0"), ("classify", "c0"), ("embed", "e1"), ("qa", "q0"), ("classify", "c1")]
        outs = await asyncio.gather(*(s.submit(kind, "a", [text]) for kind, text in reqs))
        await s.close()
        return reqs, outs

    reqs, outs = asyncio.run(main())
    for (kind, text), (res, _) in zip(reqs, outs):
        assert res == [(kind, text)]
    assert [sorted(c) for c in rec.calls] == [sorted(reqs)]  # one forward, each row its own kind


def test_adapter_order_groups_equal_keys_stably() -> None:
    from serving.engine.mixed import adapter_order

    assert adapter_order(["b", None, "a", "b", None, "a", "c"]) == [0, 3, 1, 4, 2, 5, 6]
    assert adapter_order([]) == []


@pytest.mark.parametrize("rows", [["p", "p", None, "q", "q"], ["p", None, "q", "p", "q"]], ids=["slices", "scattered"])
def test_mixed_lora_hooks_equal_the_per_row_formula(rows: list[str | None]) -> None:
    """Both ways a group is addressed (a slice of the batch, or gathered indices) add x A'^T B'^T to its rows only."""
    from serving.engine.mixed import mixed_lora
    from serving.engine.weights import TargetDelta

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    pairs = {
        name: {t: TargetDelta(b=torch.randn(o, 3, generator=g), a=torch.randn(3, i, generator=g))
               for t, (i, o) in {"0": (6, 5), "1": (5, 4)}.items()}
        for name in ("p", "q")
    }
    x = torch.randn(len(rows), 2, 6, generator=g)
    with torch.inference_mode(), mixed_lora(model, [pairs[r] if r else None for r in rows], torch.device("cpu")):
        got = model(x)
    with torch.inference_mode():
        for k, r in enumerate(rows):
            h = x[k]
            for t, layer in (("0", model[0]), ("1", model[1])):
                h = layer(h) + ((h @ pairs[r][t].a.t()) @ pairs[r][t].b.t() if r else 0)
            torch.testing.assert_close(got[k], h, atol=1e-5, rtol=1e-5)
    assert all(not m._forward_hooks for m in model.modules())
