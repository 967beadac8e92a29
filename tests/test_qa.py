"""Question answering on the embedded MiniLM with random QA adapters, against an independent
decode (tests/qa_reference.py: the documented rule over AutoModelForQuestionAnswering with W'
written in by hand): long contexts over several windows, a best span that crosses two
windows, mixed-adapter batches (engine and scheduler), request errors, and the HTTP route
in process (real FastAPI app, real ModelServer and engine, joined calls included)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from adapters.bundle import AdapterBundle, Task, save_bundle
from adapters.tasks.errors import InvalidRequest, UnsupportedTask
from adapters.tasks.qa import QAInput
from serving.config_sources import config_of
from serving.engine.engine import Engine
from tests.engine_utils import (
    MINILM_ID,
    bundle_for,
    classify,
    embed,
    engine_for,
    engine_with,
    same_weights,
    weights_snapshot,
)
from tests.qa_reference import Answer, crosses_windows, qa_model, reference_answer
from tests.serve_helpers import error_of, in_process_app

torch.set_num_threads(1)

QA_TARGETS = ("attention.self.query", "attention.self.value")
# ~1000 tokens: four windows of 384 with the default overlap; accents, a newline and double
# spaces, so the character offsets are checked where tokens and characters differ
_FACTS = [
    "Item {i} was painted {c} by {n} in {y}.",
    "The {c} crate number {i} left Zürich for São Paulo in {y}, signed by {n}.",
    "In {y} {n} wrote a naïve note about box {i}:  it was {c}.",
]
_COLOURS = ["green", "blue", "red", "amber", "violet", "grey"]
_NAMES = ["Alice", "Bob", "Chloé", "Dmitri", "Eun-ji", "Farouk"]
LONG = "\n".join(
    _FACTS[i % 3].format(i=i, c=_COLOURS[i % 6], n=_NAMES[(i * 5) % 6], y=1900 + 7 * i) for i in range(60)
)
SHORT = "Bob went home after the match, which his team won three to one."
QUESTIONS = ["Who painted item 17?", "Where did the violet crate go?", "What did Chloé write about?"]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir: Path):
    return AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="module")
def bundles(minilm_dir: Path) -> dict[str, AdapterBundle]:
    probe = engine_for(minilm_dir, MINILM_ID)
    return {
        "qa-a": bundle_for(probe, QA_TARGETS, seed=21, task=Task.QUESTION_ANSWERING),
        "qa-b": bundle_for(probe, QA_TARGETS + ("intermediate.dense",), seed=22, rank=4, task=Task.QUESTION_ANSWERING),
        "cls": bundle_for(probe, QA_TARGETS, seed=23, task=Task.SEQUENCE_CLASSIFICATION, labels=["x", "y", "z"]),
        "fe": bundle_for(probe, QA_TARGETS, seed=24),
    }


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path, bundles: dict[str, AdapterBundle]) -> Engine:
    return engine_with(minilm_dir, MINILM_ID, bundles)


@pytest.fixture(scope="module")
def oracles(minilm_dir: Path, bundles: dict[str, AdapterBundle]) -> dict[str, torch.nn.Module]:
    return {name: qa_model(minilm_dir, bundles[name]) for name in ("qa-a", "qa-b")}


def assert_same(got, want: Answer) -> None:
    """Answer text and character offsets equal; score within 1e-4 (float32 vs the reference's loops)."""
    assert (got.answer, got.start, got.end) == (want.answer, want.start, want.end), (got, want)
    assert abs(got.score - want.score) <= 1e-4, (got.score, want.score)


def qa_rows(engine: Engine, items: list[QAInput], adapters: list[str], mixed: bool = False):
    return engine.encode(items, adapters, ["qa"] * len(items), mixed=mixed)


def window_tokens(tokenizer, item: QAInput, window: int = 384, stride: int = 128) -> int:
    enc = tokenizer(item.question, item.context, truncation="only_second", max_length=window, stride=stride,
                    return_overflowing_tokens=True)
    return sum(len(ids) for ids in enc["input_ids"])


def test_long_contexts_equal_the_reference_decode(minilm: Engine, oracles, tokenizer) -> None:
    """One merged batch: three questions on a context of three windows and one short one."""
    items = [QAInput(question=q, context=LONG) for q in QUESTIONS] + [QAInput(question="Who went home?", context=SHORT)]
    got = qa_rows(minilm, items, ["qa-a"] * len(items))
    assert minilm.mode == "merged"
    for row, item in zip(got, items):
        want = reference_answer(oracles["qa-a"], tokenizer, item.question, item.context)
        assert_same(row, want)
        assert row.answer == item.context[row.start:row.end] and row.task == "qa"
        assert row.prompt_tokens == window_tokens(tokenizer, item)
    assert len(reference_answer(oracles["qa-a"], tokenizer, QUESTIONS[0], LONG).windows) == 4
    # each input's answer is its own: alone, it is the same
    alone = qa_rows(minilm, items[1:2], ["qa-a"])[0]
    assert (alone.answer, alone.start, alone.end) == (got[1].answer, got[1].start, got[1].end)


def test_best_span_across_two_windows(minilm_dir: Path, bundles, oracles, tokenizer) -> None:
    """With 64-token windows (max_seq_len=64: overlap min(128, 64 // 2) = 32) a context spans
    several windows; among fixed questions, one's best span starts in one window and ends past
    it, so only the next window holds it whole. The server decodes every question as the
    reference does, that one included."""
    engine = engine_with(minilm_dir, MINILM_ID, {"qa-a": bundles["qa-a"]}, max_seq_len=64)
    rng = random.Random(7)
    words = "the river city morning light paper window garden street bright quiet mountain".split()
    context = " ".join(rng.choice(words) for _ in range(140))
    crossing = None
    for _ in range(40):
        item = QAInput(question=f"which {rng.choice(words)} is {rng.choice(words)}?", context=context)
        want = reference_answer(oracles["qa-a"], tokenizer, item.question, context, window=64, stride=32)
        assert_same(qa_rows(engine, [item], ["qa-a"])[0], want)
        if crosses_windows(want):
            crossing = (item, want)
            break
    assert crossing is not None, "no question's best span crossed a window boundary"
    item, want = crossing
    lo, hi = want.windows[want.window - 1]
    assert want.start < hi < want.end and len(want.windows) >= 4
    # in a batch with other questions on the same context, its answer is the same
    others = [QAInput(question=q, context=context) for q in ("what is quiet?", "where is the garden?")]
    rows = qa_rows(engine, [others[0], item, others[1]], ["qa-a"] * 3)
    assert_same(rows[1], want)


def test_mixed_batch_rows_equal_their_own_references(minilm: Engine, oracles, tokenizer) -> None:
    """One unmerged forward with two QA adapters, an embedding of the base and a classifier:
    every row equals its own adapter's reference, and the base weights stay bit-exact."""
    minilm.activate(None)
    snapshot = weights_snapshot(minilm.model)
    inputs = [
        QAInput(question=QUESTIONS[0], context=LONG),
        QAInput(question=QUESTIONS[0], context=LONG),
        "an embedding of the base",
        QAInput(question="Who went home?", context=SHORT),
        "a sentence to classify",
        QAInput(question="What did the team win?", context=SHORT, max_answer_len=2),
    ]
    adapters = ["qa-a", "qa-b", None, "qa-b", "cls", "qa-a"]
    tasks = ["qa", "qa", "embed", "qa", "classify", "qa"]
    rows = minilm.encode(inputs, adapters, tasks, mixed=True)
    assert minilm.mode == "mixed"
    assert same_weights(minilm.model, snapshot)
    assert all(not m._forward_hooks for m in minilm.model.modules())
    for row, item, name in zip(rows, inputs, adapters):
        if isinstance(item, QAInput):
            want = reference_answer(oracles[name], tokenizer, item.question, item.context, item.max_answer_len)
            assert_same(row, want)
    assert len(tokenizer(rows[5].answer, add_special_tokens=False)["input_ids"]) <= 2
    assert rows[0].answer != rows[1].answer or rows[0].score != rows[1].score  # the adapters differ
    torch.testing.assert_close(rows[2].embedding, embed(minilm, [inputs[2]]).embeddings[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(rows[4].probs, classify(minilm, [inputs[4]], "cls").probs[0], atol=1e-4, rtol=0)


def test_scheduler_runs_qa_in_mixed_and_merged_batches(minilm: Engine, oracles, tokenizer, tmp_path: Path) -> None:
    """The deployment's runner: QA requests of two adapters, queued together with an embedding
    request, run in mixed batches (adaptive mode) and each gets its own reference answer."""
    from serving.deployments import ModelServer
    from serving.mode_policy import ModePolicyConfig

    server = ModelServer(config_of(registry=str(tmp_path), adapter_mode="adaptive", batch_wait_ms=50.0), engine=minilm)
    server.scheduler._policy.config = ModePolicyConfig(min_dwell_ms=0)
    asks = [("qa-a", QUESTIONS[1]), ("qa-b", QUESTIONS[2]), ("qa-a", QUESTIONS[0]), ("qa-b", QUESTIONS[1])]

    async def main():
        qa = [server.scheduler.submit("qa", a, [QAInput(question=q, context=LONG)], lengths=[900]) for a, q in asks]
        emb = server.scheduler.submit("embed", None, ["hello there"])
        out = await asyncio.gather(*qa, emb)
        await server.scheduler.close()
        return out

    out = asyncio.run(main())
    assert server.scheduler.stats().mixed_batches >= 1
    for ((rows, _), (name, q)) in zip(out[:4], asks):
        result, tokens = rows[0]
        assert_same(result, reference_answer(oracles[name], tokenizer, q, LONG))
        assert tokens == window_tokens(tokenizer, QAInput(question=q, context=LONG))


def test_qa_request_errors(minilm: Engine, minilm_dir: Path, bundles, monkeypatch: pytest.MonkeyPatch) -> None:
    item = QAInput(question="Who?", context=SHORT)
    cases = [
        (lambda: qa_rows(minilm, [item], [None]), UnsupportedTask, "needs a question-answering adapter, not the base"),
        (lambda: qa_rows(minilm, [item], ["cls"]), UnsupportedTask, "'cls' is a sequence-classification adapter, not question-answering"),
        (lambda: qa_rows(minilm, [QAInput(question="Who?", context="   ")], ["qa-a"]), InvalidRequest, "context is empty"),
        (lambda: qa_rows(minilm, [QAInput(question=" ", context=SHORT)], ["qa-a"]), InvalidRequest, "question is empty"),
        (lambda: minilm.encode(["a string"], ["qa-a"], ["qa"]), InvalidRequest, "{question, context} pairs"),
        (lambda: minilm.encode([item], ["qa-a"], ["embed"]), InvalidRequest, "must be a string"),
    ]
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()
    small = engine_with(minilm_dir, MINILM_ID, {"qa-a": bundles["qa-a"]}, max_seq_len=64)
    long_q = QAInput(question="which " * 40 + "one?", context=LONG)
    with pytest.raises(InvalidRequest, match="the question has 42 tokens, which leaves 19 context tokens per 64-token window; long contexts need more than the 32-token overlap"):
        qa_rows(small, [long_q], ["qa-a"])
    import adapters.tasks.qa as qa_mod

    monkeypatch.setattr(qa_mod, "MAX_WINDOWS", 2)
    with pytest.raises(InvalidRequest, match="the context has 912 tokens and would take 4 windows of 384 tokens; the limit is 2"):
        qa_rows(minilm, [QAInput(question="Who?", context=LONG)], ["qa-a"])


# ---------------------------------------------------------------------------- HTTP, in process


def test_question_answering_route(minilm: Engine, bundles, oracles, tokenizer, tmp_path: Path) -> None:
    """POST /v1/question-answering through the real FastAPI app, CoalescingClient and
    ModelServer (no Ray): answers equal the reference, joined calls included; wrong tasks
    and bad bodies are clear 4xx; /v1/models shows each adapter's task."""
    app, server, client = in_process_app(minilm, registry=str(tmp_path / "reg"))
    folder = tmp_path / "bundles"
    data = {n: save_bundle(b, folder / f"{n}.safetensors").read_bytes() for n, b in bundles.items()}
    asks = [("qa-a", q) for q in QUESTIONS] + [("qa-b", q) for q in QUESTIONS]

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://capaserve") as c:
            for name, raw in data.items():
                assert (await c.put(f"/v1/adapters/{name}", content=raw)).status_code == 201
            one = await c.post("/v1/question-answering", json={"model": "qa-a", "input": {"question": "Who went home?", "context": SHORT}})
            many = await c.post("/v1/question-answering", json={
                "model": "qa-b@1", "max_answer_len": 5,
                "input": [{"question": q, "context": LONG} for q in QUESTIONS],
            })
            joined = await asyncio.gather(*(
                c.post("/v1/question-answering", json={"model": a, "input": [{"question": q, "context": LONG}]})
                for a, q in asks
            ))
            bad = {
                "base": await c.post("/v1/question-answering", json={"model": MINILM_ID, "input": {"question": "q", "context": SHORT}}),
                "classifier": await c.post("/v1/question-answering", json={"model": "cls", "input": {"question": "q", "context": SHORT}}),
                "features": await c.post("/v1/question-answering", json={"model": "fe", "input": {"question": "q", "context": SHORT}}),
                "empty list": await c.post("/v1/question-answering", json={"model": "qa-a", "input": []}),
                "no context": await c.post("/v1/question-answering", json={"model": "qa-a", "input": {"question": "q"}}),
                "zero length": await c.post("/v1/question-answering", json={"model": "qa-a", "max_answer_len": 0, "input": {"question": "q", "context": SHORT}}),
                "empty context": await c.post("/v1/question-answering", json={"model": "qa-a", "input": {"question": "q", "context": ""}}),
                "classify": await c.post("/v1/classify", json={"model": "qa-a", "input": "text"}),
            }
            unknown = await c.post("/v1/question-answering", json={"model": "nope", "input": {"question": "q", "context": SHORT}})
            emb = await c.post("/v1/embeddings", json={"model": "qa-a", "input": ["hello"]})
            models = (await c.get("/v1/models")).json()
            healthy = await c.post("/v1/question-answering", json={"model": "qa-a", "input": {"question": "Who went home?", "context": SHORT}})
        await server.scheduler.close()
        return one, many, joined, bad, unknown, emb, models, healthy

    one, many, joined, bad, unknown, emb, models, healthy = asyncio.run(main())
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "list" and body["model"] == "qa-a" and set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    (d,) = body["data"]
    assert d["index"] == 0 and set(d) == {"index", "answer", "score", "start", "end"}
    assert_same(_Ans(d), reference_answer(oracles["qa-a"], tokenizer, "Who went home?", SHORT))
    assert body["usage"]["prompt_tokens"] == window_tokens(tokenizer, QAInput(question="Who went home?", context=SHORT))
    assert many.status_code == 200, many.text
    assert [x["index"] for x in many.json()["data"]] == [0, 1, 2]
    for x, q in zip(many.json()["data"], QUESTIONS):
        assert_same(_Ans(x), reference_answer(oracles["qa-b"], tokenizer, q, LONG, max_answer_len=5))
    for r, (name, q) in zip(joined, asks):
        assert r.status_code == 200, r.text
        assert_same(_Ans(r.json()["data"][0]), reference_answer(oracles[name], tokenizer, q, LONG))
    assert client.requests_joined > client.calls_sent  # some requests shared a replica call
    for what, r in bad.items():
        assert r.status_code == 400, (what, r.text)
        error_of(r)
    assert "not available for the base model" in error_of(bad["base"])["message"]
    assert "it needs one of: question-answering" in error_of(bad["classifier"])["message"]
    assert "context is empty" in error_of(bad["empty context"])["message"]
    assert unknown.status_code == 404
    assert emb.status_code == 200  # any encoder adapter embeds with its adapted encoder
    torch.testing.assert_close(torch.tensor(emb.json()["data"][0]["embedding"]), embed(minilm, ["hello"], "qa-a").embeddings[0], atol=1e-5, rtol=0)
    tasks = {m["id"]: (m["task"], m["modality"]) for m in models["data"]}
    assert tasks == {
        MINILM_ID: ("feature-extraction", "text"), "qa-a": ("question-answering", "text"),
        "qa-b": ("question-answering", "text"), "cls": ("sequence-classification", "text"), "fe": ("feature-extraction", "text"),
    }
    assert healthy.status_code == 200


class _Ans:
    def __init__(self, d: dict) -> None:
        self.answer, self.score, self.start, self.end = d["answer"], d["score"], d["start"], d["end"]
