"""Pixels for an image base: request images through the base model's own image processor.

An image base (a ViT-like encoder, see model_loader) has no tokenizer: each input is one
image (PNG or JPEG bytes, already checked by the ingress: adapters/tasks/images.py) and becomes
one model row of `tokens` positions (patches plus class token), all rows of one size.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from adapters.tasks.errors import InvalidRequest
from adapters.tasks.images import decode_image


class ImageInputs:
    """Decodes image bytes and prepares them with `processor`; one row per image."""

    def __init__(self, processor: Any, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.processor = processor
        self.device = device
        self.dtype = dtype
        #: sequence length of one image's row; probed once, so a base whose AutoModel does
        #: not give [batch, tokens, hidden] states is refused when it loads, not per request
        self.tokens = self._probe(model)

    def pixels(self, images: list[bytes]) -> torch.Tensor:
        """[n, channels, height, width] pixel values on the model's device and dtype."""
        decoded = [decode_image(data, where=f"input {i}") for i, data in enumerate(images)]
        return self._prepare(decoded)

    def _prepare(self, images: list[Image.Image]) -> torch.Tensor:
        values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return values.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def _probe(self, model: torch.nn.Module) -> int:
        hidden = getattr(model(pixel_values=self._prepare([Image.new("RGB", (8, 8))])), "last_hidden_state", None)
        if hidden is None or hidden.dim() != 3:
            shape = None if hidden is None else list(hidden.shape)
            raise ValueError(
                f"{type(model).__name__} gives last_hidden_state {shape}; an image base must be a transformer "
                "encoder whose last hidden state is [batch, tokens, hidden] (ViT, DeiT, BEiT, DINOv2, ...)"
            )
        return int(hidden.shape[1])


def check_images(inputs: list[Any], model_id: str) -> list[bytes]:
    """The inputs of an image base: every one must be image bytes (InvalidRequest otherwise)."""
    for i, x in enumerate(inputs):
        if not isinstance(x, (bytes, bytearray)):
            raise InvalidRequest(f"input {i}: {model_id!r} is an image model; each input must be an image")
    return inputs
