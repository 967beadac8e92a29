"""The load-test scenario shared by the Locust file and the runner, without importing Locust.

Why a separate module: Locust monkey-patches the process with gevent on import, so the
runner (which hosts Ray) must not import the locustfile. Everything both sides need
lives here: the fixed input texts, adapter names, Zipf popularity, request bodies, the
reference answers (single requests on a quiet server) and the checks of every answer.

Inputs follow the base: texts for a text encoder or a causal LM, small PNG and JPEG
images (data URLs) for an image base; question-answering adapters get fixed
(question, context) pairs, one context long enough to take two windows.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    import httpx

Kind = Literal["embeddings", "classify", "question-answering", "completions"]
KINDS: tuple[Kind, ...] = ("embeddings", "classify", "question-answering", "completions")
PATHS: dict[Kind, str] = {
    "embeddings": "/v1/embeddings",
    "classify": "/v1/classify",
    "question-answering": "/v1/question-answering",
    "completions": "/v1/completions",
}
#: Which endpoints an adapter of each bundle task can serve (docs/http-api.md#routes).
KINDS_OF_TASK: dict[str, tuple[Kind, ...]] = {
    "feature-extraction": ("embeddings",),
    "sequence-classification": ("embeddings", "classify"),
    "question-answering": ("embeddings", "question-answering"),
    "image-classification": ("embeddings", "classify"),
    "causal-lm": ("completions",),
}
EMBED_ATOL = 1e-4

#: Tolerance of the contamination check per server dtype. Batching changes the order of
#: float sums, so a row's answer moves with its batch-mates by ~1e-7 in float32 and
#: ~2.5e-3 in bfloat16 (measured, MiniLM, element-wise); two load-test adapters differ by
#: >= 0.12 on every text (and from the base), so 1e-2 still sees any contamination.
ATOL_BY_DTYPE: dict[str, float] = {"float32": EMBED_ATOL, "bfloat16": 1e-2, "float16": 1e-2}
COMPLETION_MAX_TOKENS = 8

#: Fixed inputs, 3 to ~40 words, so a batch pads a little but not absurdly.
TEXTS: tuple[str, ...] = (
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "capaboost merges masked low-rank updates into the base weights before serving",
    "a short one",
    "serving many adapters from one base model over http on ray serve, grouped by adapter so swaps stay rare",
    "what is the capital of france",
    "the weather today is sunny with a light breeze from the west and no rain expected until the weekend",
    "i loved this movie, the acting was superb",
    "terrible service, i will never order from this shop again",
    "transformers encode text into vectors that capture meaning",
    "please summarise the following paragraph in two sentences",
    "ok",
    "the stock market fell sharply on tuesday after the central bank raised interest rates by half a point, "
    "surprising analysts who had expected a smaller move",
    "load testing shows whether the scheduler keeps its promises under pressure",
    "cats and dogs",
    "an adapter is a small set of weights trained for one task on top of a frozen base model",
)


#: Fixed (question, context) pairs; the last context takes two 384-token windows.
_LONG = " ".join(
    f"Shipment {i} left {city} on day {i * 2} carrying {load}."
    for i, (city, load) in enumerate([("Oslo", "timber"), ("Lima", "copper"), ("Pune", "cotton"), ("Kobe", "steel")] * 12)
)
QUESTIONS: tuple[dict[str, str], ...] = (
    {"question": "What did the fox jump over?", "context": TEXTS[1]},
    {"question": "What is merged into the base weights?", "context": TEXTS[2]},
    {"question": "When is rain expected?", "context": TEXTS[6]},
    {"question": "What did the central bank raise?", "context": TEXTS[12]},
    {"question": "Who trains an adapter?", "context": TEXTS[15]},
    {"question": "What did shipment 41 carry?", "context": _LONG},
)


@cache
def images() -> tuple[str, ...]:
    """Fixed small images as data URLs (PNG and JPEG, several sizes): an image base's inputs."""
    from PIL import Image, ImageDraw  # deferred: only image bases need it

    out = []
    for i in range(8):
        img = Image.new("RGB", (48 + 8 * i, 40 + 4 * i), ((37 * i) % 256, (91 * i) % 256, (53 * i + 80) % 256))
        ImageDraw.Draw(img).ellipse((4, 4, 20 + 3 * i, 18 + 2 * i), fill=(255 - 30 * i, 20 * i, 200))
        buf = io.BytesIO()
        fmt = "PNG" if i % 2 == 0 else "JPEG"
        img.save(buf, format=fmt)
        out.append(f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode())
    return tuple(out)


def adapter_names(n: int, prefix: str = "lt-") -> list[str]:
    """`n` adapter names; the i-th is the i-th most popular under Zipf."""
    return [f"{prefix}{i:03d}" for i in range(n)]


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalised Zipf(s) popularity of ranks 1..n (s = 0 is uniform)."""
    raw = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def parse_mix(mix: str) -> dict[Kind, float]:
    """"embeddings=1,classify=1" -> weights; "auto" -> {} (every kind the adapters support, equally)."""
    if mix.strip() in ("", "auto"):
        return {}
    out: dict[Kind, float] = {}
    for part in mix.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in KINDS:
            raise ValueError(f"mix: unknown endpoint {key!r}; expected one of {', '.join(KINDS)}")
        weight = float(value) if value.strip() else 1.0
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"mix: weight of {key} must be finite and >= 0, got {value!r}")
        out[key] = weight  # type: ignore[index]
    return out


def effective_mix(mix: dict[Kind, float], supported: Sequence[Kind]) -> dict[Kind, float]:
    """The mix restricted to what the adapters support; ValueError if nothing is left."""
    chosen = {k: w for k, w in mix.items() if k in supported and w > 0} if mix else {k: 1.0 for k in supported}
    if not chosen:
        raise ValueError(f"mix {mix} selects no endpoint the adapters support ({', '.join(supported)})")
    return chosen


_PEER_WORDS = (
    "the a one every some model server request answer token vector adapter weight layer batch quick "
    "slow bright quiet river mountain city morning evening light music paper window garden street "
    "reads writes runs waits finds keeps moves sends brings turns under over across near after "
    "before while because and but often never always again here there today tomorrow"
).split()


def peer_sentences(n: int = 200, seed: int = 20261203) -> list[str]:
    """`n` fixed sentences of 5-20 words (seeded): the texts bench_peer sends every server."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(_PEER_WORDS, k=rng.randint(5, 20))) for _ in range(n)]


def request_body(kind: Kind, model: str, texts: list[Any]) -> dict[str, Any]:
    """The JSON body of one request; completions are greedy so answers are reproducible.
    `texts` are the inputs: texts or image data URLs, or {question, context} pairs."""
    if kind == "completions":
        return {
            "model": model,
            "prompt": texts[0],
            "max_tokens": COMPLETION_MAX_TOKENS,
            "temperature": 0.0,
            "seed": 0,
        }
    return {"model": model, "input": texts[0] if len(texts) == 1 else texts}


class Answer(BaseModel):
    answer: str
    score: float
    start: int
    end: int


class Reference(BaseModel):
    """One adapter's answers for every fixed input, from requests sent while the server is quiet."""

    adapter: str
    task: str = Field(..., description="The adapter's bundle task (from its manifest).")
    embeddings: list[list[float]] | None = Field(None, description="Per text: the embedding.")
    labels: list[str] | None = Field(None, description="Per text: the classify label.")
    probs: list[list[float]] | None = Field(None, description="Per text: the classify probabilities.")
    completions: list[str] | None = Field(None, description="Per text: the greedy completion text.")
    answers: list[Answer] | None = Field(None, description="Per question: the answer.")

    @property
    def kinds(self) -> tuple[Kind, ...]:
        return KINDS_OF_TASK.get(self.task, ())


class ReferenceSet(BaseModel):
    """References of many adapters, saved as JSON so several runs (and servers) share them."""

    texts: list[str] = Field(default_factory=lambda: list(TEXTS), description="Texts, or an image base's images.")
    questions: list[dict[str, str]] = Field(default_factory=lambda: list(QUESTIONS))
    adapters: dict[str, Reference] = Field(default_factory=dict)

    def inputs(self, kind: Kind, idx: list[int]) -> list[Any]:
        """The inputs a request of `kind` sends for the drawn indices."""
        pool = self.questions if kind == "question-answering" else self.texts
        return [pool[i] for i in idx]

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json())

    @classmethod
    def load(cls, path: Path) -> "ReferenceSet":
        return cls.model_validate_json(path.read_text())


def _post(client: httpx.Client, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(PATHS[kind], json=body)
    if r.status_code != 200:
        raise RuntimeError(f"reference {kind} for {body['model']!r}: HTTP {r.status_code}: {r.text[:300]}")
    return r.json()


def compute_reference(
    client: httpx.Client, adapter: str, texts: Sequence[str] = TEXTS, questions: Sequence[dict[str, str]] = QUESTIONS
) -> Reference:
    """Single requests, one at a time: the answers a request gets when nothing else runs.

    Encoder kinds send all fixed inputs in one request; completions send one prompt each.
    """
    r = client.get(f"/v1/adapters/{adapter}")
    if r.status_code != 200:
        raise RuntimeError(f"adapter {adapter!r} is not registered: HTTP {r.status_code}: {r.text[:300]}")
    ref = Reference(adapter=adapter, task=r.json()["task"])
    if "embeddings" in ref.kinds:
        body = _post(client, "embeddings", {"model": adapter, "input": list(texts)})
        ref.embeddings = [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]
    if "classify" in ref.kinds:
        data = sorted(_post(client, "classify", {"model": adapter, "input": list(texts)})["data"], key=lambda d: d["index"])
        ref.labels = [d["label"] for d in data]
        ref.probs = [d["probs"] for d in data]
    if "question-answering" in ref.kinds:
        body = _post(client, "question-answering", {"model": adapter, "input": list(questions)})
        ref.answers = [Answer.model_validate(d) for d in sorted(body["data"], key=lambda d: d["index"])]
    if "completions" in ref.kinds:
        ref.completions = [
            _post(client, "completions", request_body("completions", adapter, [t]))["choices"][0]["text"] for t in texts
        ]
    return ref


def compute_references(base_url: str, adapters: Sequence[str], timeout: float = 120.0) -> ReferenceSet:
    """References for `adapters` from the server at `base_url` (sequential single requests);
    an image base (its /v1/models card says so) gets images instead of texts."""
    import httpx  # the loadtest extra: imported when used, so the flags load without it

    with httpx.Client(base_url=base_url, timeout=timeout) as client:
        base = client.get("/v1/models").json()["data"][0]
        refs = ReferenceSet(texts=list(images())) if base.get("modality") == "image" else ReferenceSet()
        for name in adapters:
            refs.adapters[name] = compute_reference(client, name, refs.texts, refs.questions)
    return refs


class CheckError(Exception):
    """An answer of the wrong shape (a failure)."""


class Contaminated(Exception):
    """A well-formed answer that differs from the single-request answer (counted apart)."""


def _close(a: Sequence[float], b: Sequence[float], atol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= atol for x, y in zip(a, b))


def check_answer(
    kind: Kind, body: Any, ref: Reference, idx: list[int], compare: bool, atol: float = EMBED_ATOL
) -> None:
    """Raise CheckError on a malformed answer, Contaminated on a wrong one (when `compare`).

    `idx` are the indices into the fixed texts that the request sent, in order.
    """
    if not isinstance(body, dict):
        raise CheckError(f"{kind}: body is not a JSON object")
    if kind == "completions":
        choices = body.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0].get("text"), str):
            raise CheckError(f"completions: expected one choice with text, got {str(choices)[:200]}")
        if compare and ref.completions is not None and choices[0]["text"] != ref.completions[idx[0]]:
            raise Contaminated(
                f"{ref.adapter} completion of text {idx[0]}: {choices[0]['text']!r} != {ref.completions[idx[0]]!r}"
            )
        return
    data = body.get("data")
    if not isinstance(data, list) or len(data) != len(idx):
        raise CheckError(f"{kind}: expected {len(idx)} items in data, got {type(data).__name__} {str(data)[:120]}")
    if [d.get("index") for d in data] != list(range(len(idx))):
        raise CheckError(f"{kind}: indices {[d.get('index') for d in data]} are not 0..{len(idx) - 1}")
    if kind == "question-answering":
        _check_answers(data, ref, idx, compare, atol)
        return
    if kind == "embeddings":
        assert ref.embeddings is not None
        dim = len(ref.embeddings[0])
        for d in data:
            emb = d.get("embedding")
            if not isinstance(emb, list) or len(emb) != dim:
                raise CheckError(f"embeddings: expected {dim} floats, got {len(emb) if isinstance(emb, list) else emb!r}")
        if compare:
            for d, i in zip(data, idx):
                if not _close(d["embedding"], ref.embeddings[i], atol):
                    worst = max(abs(x - y) for x, y in zip(d["embedding"], ref.embeddings[i]))
                    raise Contaminated(f"{ref.adapter} embedding of text {i} differs by {worst:.2e} > {atol}")
        return
    assert ref.probs is not None and ref.labels is not None
    n_labels = len(ref.probs[0])
    for d in data:
        probs = d.get("probs")
        if not isinstance(probs, list) or len(probs) != n_labels or not isinstance(d.get("label"), str):
            raise CheckError(f"classify: expected a label and {n_labels} probs, got {str(d)[:200]}")
        if abs(sum(probs) - 1.0) > 1e-3:
            raise CheckError(f"classify: probs sum to {sum(probs)}, not 1")
    if compare:
        for d, i in zip(data, idx):
            top2 = sorted(ref.probs[i], reverse=True)[:2]
            tie = len(top2) == 2 and top2[0] - top2[1] <= atol  # noise within atol may flip the argmax
            if (d["label"] != ref.labels[i] and not tie) or not _close(d["probs"], ref.probs[i], atol):
                raise Contaminated(f"{ref.adapter} classify of text {i}: {d['label']} {d['probs']} != {ref.labels[i]} {ref.probs[i]}")


def _check_answers(data: list[Any], ref: Reference, idx: list[int], compare: bool, atol: float) -> None:
    for d in data:
        try:
            got = Answer.model_validate(d)
        except ValueError:
            raise CheckError(f"question-answering: expected answer, score, start, end, got {str(d)[:200]}") from None
        if not 0 <= got.start <= got.end or not 0.0 <= got.score <= 1.0:
            raise CheckError(f"question-answering: offsets or score out of range: {str(d)[:200]}")
    if compare:
        assert ref.answers is not None
        for d, i in zip(data, idx):
            want = ref.answers[i]
            if (d["answer"], d["start"], d["end"]) != (want.answer, want.start, want.end) or abs(d["score"] - want.score) > atol:
                raise Contaminated(f"{ref.adapter} answer to question {i}: {str(d)[:200]} != {want}")


class Picker:
    """Draws (kind, adapter, text indices) for one request: mix, Zipf popularity, uniform texts."""

    def __init__(
        self, refs: ReferenceSet, adapters: Sequence[str], zipf_s: float, mix: dict[Kind, float],
        texts_per_request: int = 1, seed: int | None = None,
    ) -> None:
        missing = [a for a in adapters if a not in refs.adapters]
        if missing:
            raise ValueError(f"no reference answers for adapters {missing[:5]}{'...' if len(missing) > 5 else ''}")
        supported = [k for k in KINDS if all(k in refs.adapters[a].kinds for a in adapters)]
        self.mix = effective_mix(mix, supported)
        self.adapters = list(adapters)
        self.weights = zipf_weights(len(self.adapters), zipf_s)
        self.n_inputs = {k: len(refs.questions if k == "question-answering" else refs.texts) for k in KINDS}
        self.texts_per_request = max(1, texts_per_request)
        self.rng = random.Random(seed)

    def draw(self) -> tuple[Kind, str, list[int]]:
        kind: Kind = self.rng.choices(list(self.mix), weights=list(self.mix.values()))[0]
        adapter = self.rng.choices(self.adapters, weights=self.weights)[0]
        n = self.n_inputs[kind]
        per = 1 if kind == "completions" else min(self.texts_per_request, n)
        return kind, adapter, self.rng.sample(range(n), per)


class RunSummary(BaseModel):
    """What the Locust process reports beyond its CSVs: checks done and contamination found."""

    requests: int = 0
    failures: int = 0
    checked: int = 0
    contaminated: int = 0
    by_kind: dict[str, int] = Field(default_factory=dict)
    by_adapter: dict[str, int] = Field(default_factory=dict)
    samples: list[str] = Field(default_factory=list, description="The first few failure and contamination messages.")

    def note(self, message: str) -> None:
        if len(self.samples) < 10:
            self.samples.append(message)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.model_dump(), indent=1))
