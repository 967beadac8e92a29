"""Independent image-classification references: test images as data URLs, and
`ViTForImageClassification` with W' written into its encoder by hand and the bundle's head
copied into its classifier, fed pixels from images decoded by transformers' own `load_image`."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import ViTForImageClassification
from transformers.image_utils import load_image

from adapters.bundle import AdapterBundle
from tests.engine_utils import hand_merge


def data_url(img: Image.Image, fmt: str, **save: object) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    mime = "png" if fmt == "PNG" else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = torch.randint(0, 256, (h, w, channels), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


#: PNG (RGB, RGBA, grey) and JPEG images of several sizes, none square like the model's input
IMAGES = [
    data_url(noise(40, 30, 1), "PNG"),
    data_url(noise(64, 48, 2), "JPEG", quality=90),
    data_url(noise(33, 50, 3, "RGBA"), "PNG"),
    data_url(noise(20, 60, 4, "L"), "PNG"),
    data_url(Image.new("RGB", (48, 48), (200, 30, 90)), "JPEG"),
]


def vit_classifier(folder: Path, bundle: AdapterBundle) -> torch.nn.Module:
    """ViTForImageClassification of `folder` with W' in its encoder and the bundle's head."""
    labels = bundle.metadata.labels or []
    model = ViTForImageClassification.from_pretrained(str(folder), num_labels=len(labels)).eval()
    hand_merge(model.vit, bundle)  # targets are named as AutoModel (ViTModel) names them
    with torch.no_grad():
        model.classifier.weight.copy_(bundle.head["head.out.weight"])
        model.classifier.bias.copy_(bundle.head["head.out.bias"])
    return model


def reference_probs(model: torch.nn.Module, processor: Any, urls: list[str]) -> torch.Tensor:
    pixels = processor(images=[load_image(u) for u in urls], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        return torch.softmax(model(pixel_values=pixels).logits, dim=-1)
