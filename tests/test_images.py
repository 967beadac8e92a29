"""Image classification on a tiny random ViT saved with its image processor (an image base,
as `capaserve serve --model ./vit-folder` loads it), against `ViTForImageClassification`
with W' and the head written in by hand, images decoded by transformers' own `load_image`:
merged and mixed batches, embeddings of images, request errors, and the HTTP routes in
process (PNG and JPEG data URLs, every kind of bad image answered 4xx, the server healthy after)."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from transformers import AutoImageProcessor, AutoModel
from transformers.image_utils import load_image

from adapters.bundle import AdapterBundle, Task, save_bundle
from adapters.tasks.errors import InvalidRequest, UnsupportedTask
from adapters.tasks.qa import QAInput
from serving.engine.engine import Engine
from tests.engine_utils import bundle_for, engine_for, engine_with, hand_merge, same_weights, weights_snapshot
from tests.image_reference import IMAGES, data_url, reference_probs, vit_classifier
from tests.serve_helpers import error_of, in_process_app

torch.set_num_threads(1)

VIT_ID = "tiny/vit"
LABELS = {"birds": ["sparrow", "crow", "gull"], "pets": ["cat", "dog"]}


def raw(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


@pytest.fixture(scope="module")
def bundles(tiny_vit_dir: Path) -> dict[str, AdapterBundle]:
    probe = engine_for(tiny_vit_dir, VIT_ID)
    return {
        "birds": bundle_for(probe, ("q_proj", "v_proj"), seed=31, task=Task.IMAGE_CLASSIFICATION, labels=LABELS["birds"]),
        "pets": bundle_for(probe, ("q_proj", "k_proj", "mlp.fc1"), seed=32, rank=4, task=Task.IMAGE_CLASSIFICATION,
                           labels=LABELS["pets"]),
        "vfe": bundle_for(probe, ("v_proj", "o_proj"), seed=33),
    }


@pytest.fixture(scope="module")
def vit(tiny_vit_dir: Path, bundles: dict[str, AdapterBundle]) -> Engine:
    return engine_with(tiny_vit_dir, VIT_ID, bundles)


@pytest.fixture(scope="module")
def processor(tiny_vit_dir: Path):
    return AutoImageProcessor.from_pretrained(str(tiny_vit_dir))


@pytest.fixture(scope="module")
def oracle(tiny_vit_dir: Path, bundles: dict[str, AdapterBundle], processor):
    """name -> probabilities of images (data URLs) by ViTForImageClassification with W' and the head written in."""
    models = {name: vit_classifier(tiny_vit_dir, bundles[name]) for name in LABELS}
    return lambda name, urls: reference_probs(models[name], processor, urls)


def hand_embedding(folder: Path, bundle: AdapterBundle | None, processor, urls: list[str]) -> torch.Tensor:
    """The documented embedding rule on ViTModel (W' by hand): mean of every position's last state, L2-normalised."""
    model = AutoModel.from_pretrained(str(folder)).eval()
    if bundle is not None:
        hand_merge(model, bundle)
    pixels = processor(images=[load_image(u) for u in urls], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        h = model(pixel_values=pixels).last_hidden_state
    return torch.nn.functional.normalize(h.mean(dim=1), dim=-1)


def test_image_base_is_detected_with_its_processor(vit: Engine) -> None:
    assert vit.spec.modality == "image" and vit.tokenizer is None
    assert vit.images is not None and vit.images.tokens == (32 // 8) ** 2 + 1


def test_classify_merged_equals_vit_for_image_classification(vit: Engine, oracle) -> None:
    for name in LABELS:
        rows = vit.encode([raw(u) for u in IMAGES], [name] * len(IMAGES), ["classify"] * len(IMAGES))
        assert vit.mode == "merged"
        want = oracle(name, IMAGES)
        got = torch.stack([r.probs for r in rows])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert [r.label for r in rows] == [LABELS[name][i] for i in want.argmax(-1).tolist()]
        assert all(r.label_names == LABELS[name] and r.prompt_tokens == 17 for r in rows)
    assert not torch.allclose(oracle("birds", IMAGES[:1]), oracle("birds", IMAGES[1:2]), atol=1e-3)  # inputs matter


def test_mixed_batch_rows_equal_their_own_references(vit: Engine, oracle, bundles, tiny_vit_dir: Path, processor) -> None:
    vit.activate(None)
    snapshot = weights_snapshot(vit.model)
    adapters = ["birds", "pets", None, "vfe", "birds", "pets"]
    tasks = ["classify", "classify", "embed", "embed", "classify", "embed"]
    rows = vit.encode([raw(u) for u in IMAGES + IMAGES[:1]], adapters, tasks, mixed=True)
    assert vit.mode == "mixed" and same_weights(vit.model, snapshot)
    urls = IMAGES + IMAGES[:1]
    for row, name, task, url in zip(rows, adapters, tasks, urls):
        if task == "classify":
            torch.testing.assert_close(row.probs, oracle(name, [url])[0], atol=1e-4, rtol=0)
        else:
            want = hand_embedding(tiny_vit_dir, bundles.get(name) if name else None, processor, [url])[0]
            torch.testing.assert_close(row.embedding, want, atol=1e-4, rtol=0)
            assert row.prompt_tokens == 17


def test_swaps_on_the_image_base_are_exact(vit: Engine, bundles) -> None:
    """In-place swaps over ViT's q/k/v/o and MLP weights: A -> B -> A is bit-identical and the
    base comes back bit-exactly, the weight tensors never replaced."""
    vit.activate(None)
    base = weights_snapshot(vit.model)
    ptrs = {n: p.data_ptr() for n, p in vit.model.named_parameters()}
    vit.activate("birds")
    after_birds = weights_snapshot(vit.model)
    assert not same_weights(vit.model, base)
    vit.activate("pets")
    vit.activate("birds")
    assert same_weights(vit.model, after_birds)
    vit.activate(None)
    assert same_weights(vit.model, base)
    assert ptrs == {n: p.data_ptr() for n, p in vit.model.named_parameters()}


def test_image_request_errors(vit: Engine, minilm_dir: Path) -> None:
    png = raw(IMAGES[0])
    cases = [
        (lambda: vit.encode(["a text"], [None], ["embed"]), InvalidRequest, "'tiny/vit' is an image model"),
        (lambda: vit.encode([png], ["vfe"], ["classify"]), UnsupportedTask, "'vfe' is a feature-extraction adapter, not image-classification"),
        (lambda: vit.encode([png], [None], ["classify"]), UnsupportedTask, "classification needs an image-classification adapter, not the base model"),
        (lambda: vit.encode([QAInput(question="q", context="c")], ["birds"], ["qa"]), UnsupportedTask, "needs a text base model"),
        (lambda: vit.encode([png[:200]], ["birds"], ["classify"]), InvalidRequest, "truncated or corrupt"),
        (lambda: vit.encode([b"not an image"], ["birds"], ["classify"]), InvalidRequest, "not a PNG or JPEG image"),
    ]
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()
    text = engine_for(minilm_dir)
    with pytest.raises(InvalidRequest, match="is a text model; inputs must be strings"):
        text.encode([png], [None], ["embed"])


# ---------------------------------------------------------------------------- HTTP, in process

MAX_PIXELS = 64 * 64
MAX_BYTES = 20_000


def _bad_images() -> dict[str, tuple[str, int, str]]:
    """name -> (input, status, message fragment)."""
    png = raw(IMAGES[0])
    big = Image.new("RGB", (100, 100), (1, 2, 3))  # 10,000 pixels, a few hundred bytes
    meta = PngInfo()
    meta.add_text("padding", "x" * 30_000)
    heavy = io.BytesIO()
    Image.new("RGB", (8, 8)).save(heavy, format="PNG", pnginfo=meta)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return {
        "truncated": ("data:image/png;base64," + b64(png[: len(png) // 2]), 400, "truncated or corrupt"),
        "not an image": ("data:image/png;base64," + b64(b"hello, this is text and not a picture"), 400, "not a PNG or JPEG image"),
        "too many pixels": (data_url(big, "PNG"), 400, f"100x100 pixels, more than the limit of {MAX_PIXELS}"),
        "too many bytes": ("data:image/png;base64," + b64(heavy.getvalue()), 413, f"larger than the limit of {MAX_BYTES} bytes"),
        "remote https": ("https://example.com/cat.png", 400, "remote image URLs are not fetched"),
        "remote http": ("http://127.0.0.1:1/x.jpg", 400, "remote image URLs are not fetched"),
        "file url": ("file:///etc/passwd", 400, "remote image URLs are not fetched"),
        "plain text": ("a picture of a cat", 400, "not an image data URL"),
        "gif": ("data:image/gif;base64,R0lGODlhAQABAAAAACw=", 400, "unsupported image type 'image/gif'"),
        "not base64": ("data:image/png;base64,@@@@", 400, "not valid base64"),
        "no base64 flag": ("data:image/png," + b64(png), 400, "must be base64-encoded"),
        "declared jpeg, is png": ("data:image/jpeg;base64," + b64(png), 400, "declared as JPEG but the data is a PNG image"),
    }


def test_image_routes(vit: Engine, bundles, oracle, tiny_vit_dir: Path, processor, tmp_path: Path) -> None:
    """/v1/classify and /v1/embeddings with data URLs through the real FastAPI app,
    CoalescingClient and ModelServer (no Ray): equal to the references, joined calls
    included; each bad image is a clear 4xx that fails only its own request."""
    app, server, client = in_process_app(
        vit, registry=str(tmp_path / "reg"), max_image_pixels=MAX_PIXELS, max_image_bytes=MAX_BYTES
    )
    data = {n: save_bundle(b, tmp_path / f"{n}.safetensors").read_bytes() for n, b in bundles.items()}
    bad = _bad_images()

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://capaserve") as c:
            for name, payload in data.items():
                assert (await c.put(f"/v1/adapters/{name}", content=payload)).status_code == 201
            many = await c.post("/v1/classify", json={"model": "birds", "input": IMAGES})
            one = await c.post("/v1/classify", json={"model": "pets@1", "input": IMAGES[1]})
            emb = await c.post("/v1/embeddings", json={"model": VIT_ID, "input": IMAGES[:2]})
            # good and bad requests at once: the bad ones are refused before they could be joined
            mixed = await asyncio.gather(
                *(c.post("/v1/classify", json={"model": "pets", "input": [u]}) for u in IMAGES),
                *(c.post("/v1/classify", json={"model": "pets", "input": [IMAGES[0], bad[k][0]]}) for k in bad),
            )
            wrong = {
                "text classifier input": await c.post("/v1/classify", json={"model": "birds", "input": ["a cat"]}),
                "qa on an image base": await c.post("/v1/question-answering", json={"model": "birds", "input": {"question": "q", "context": "c"}}),
                "classify the base": await c.post("/v1/classify", json={"model": VIT_ID, "input": IMAGES[0]}),
                "classify with features": await c.post("/v1/classify", json={"model": "vfe", "input": IMAGES[0]}),
                "completions": await c.post("/v1/completions", json={"model": VIT_ID, "prompt": "hi"}),
            }
            models = (await c.get("/v1/models")).json()
            after = await c.post("/v1/classify", json={"model": "birds", "input": IMAGES[:2]})
        await server.scheduler.close()
        return many, one, emb, mixed, wrong, models, after

    many, one, emb, mixed, wrong, models, after = asyncio.run(main())
    assert many.status_code == 200, many.text
    body = many.json()
    assert body["model"] == "birds" and [d["index"] for d in body["data"]] == list(range(len(IMAGES)))
    assert body["usage"]["prompt_tokens"] == 17 * len(IMAGES)
    want = oracle("birds", IMAGES)
    torch.testing.assert_close(torch.tensor([d["probs"] for d in body["data"]]), want, atol=1e-4, rtol=0)
    assert [d["label"] for d in body["data"]] == [LABELS["birds"][i] for i in want.argmax(-1).tolist()]
    assert one.status_code == 200, one.text
    torch.testing.assert_close(torch.tensor(one.json()["data"][0]["probs"]), oracle("pets", IMAGES[1:2])[0], atol=1e-4, rtol=0)
    assert emb.status_code == 200, emb.text
    got = torch.tensor([d["embedding"] for d in emb.json()["data"]])
    torch.testing.assert_close(got, hand_embedding(tiny_vit_dir, None, processor, IMAGES[:2]), atol=1e-4, rtol=0)

    good, refused = mixed[: len(IMAGES)], mixed[len(IMAGES):]
    for r, url in zip(good, IMAGES):
        assert r.status_code == 200, r.text
        torch.testing.assert_close(torch.tensor(r.json()["data"][0]["probs"]), oracle("pets", [url])[0], atol=1e-4, rtol=0)
    assert client.requests_joined > client.calls_sent  # the good ones were joined
    for (name, (_, status, fragment)), r in zip(bad.items(), refused):
        assert r.status_code == status, (name, r.text)
        err = error_of(r)
        assert fragment in err["message"] and err["message"].startswith("input 1: "), (name, err)
    for what, r in wrong.items():
        assert r.status_code == 400, (what, r.text)
    assert "not an image data URL" in error_of(wrong["text classifier input"])["message"]
    assert "it needs one of: image-classification" in error_of(wrong["classify with features"])["message"]
    cards = {m["id"]: (m["task"], m["modality"]) for m in models["data"]}
    assert cards == {
        VIT_ID: ("feature-extraction", "image"), "birds": ("image-classification", "image"),
        "pets": ("image-classification", "image"), "vfe": ("feature-extraction", "image"),
    }
    assert after.status_code == 200  # still serving


def test_registry_refuses_text_tasks_on_an_image_base(vit: Engine, minilm_dir: Path, tmp_path: Path) -> None:
    """Upload validation: a question-answering (text) bundle named for the ViT does not fit it."""
    from adapters.synthetic import random_bundle

    app, server, _ = in_process_app(vit, registry=str(tmp_path / "reg"))
    qa = random_bundle(vit.spec, ["layers.0.attention.q_proj"], task=Task.QUESTION_ANSWERING)
    payload = save_bundle(qa, tmp_path / "qa.safetensors").read_bytes()

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://capaserve") as c:
            r = await c.put("/v1/adapters/qa", content=payload)
        await server.scheduler.close()
        return r

    r = asyncio.run(main())
    assert r.status_code == 400
    err = error_of(r)
    assert err["type"] == "invalid_adapter" and "needs a base model that takes text input; 'tiny/vit' takes image" in err["message"]
