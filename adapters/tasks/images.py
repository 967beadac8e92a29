"""Images in requests: `data:image/png;base64,...` and `data:image/jpeg;base64,...` URLs.

The server never fetches anything: an `http(s)://` URL (or any other string that is not
a data URL) is refused with 400, so an image input cannot make the server reach a
network address (no SSRF). The ingress checks every image before a request goes to a
replica (`image_bytes`: type, size in bytes (413 beyond the limit), pixel count, and a
full decode, so a truncated file is caught): a bad image fails its own request only,
never a batch it might have been joined with. Replicas decode the same bytes again
(`decode_image`) for the base's image processor. As transformers' own `load_image`
does, an image is turned upright by its EXIF orientation and converted to RGB.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from adapters.tasks.errors import InvalidRequest, PayloadTooLarge

#: Declared media types and the Pillow format each must decode as.
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one image of a request (ServerConfig.max_image_bytes / max_image_pixels)."""

    max_bytes: int
    max_pixels: int


def is_image_data_url(text: str) -> bool:
    """True for a `data:image/...,` URL (any image type, encoded or not): an image, whatever base
    it is sent to. A text base refuses it (400) rather than embed or classify its characters."""
    m = _DATA_URL.match(text.lstrip())
    return m is not None and m.group("mime").strip().lower().startswith("image/")


def image_bytes(url: object, index: int, limits: ImageLimits) -> bytes:
    """The checked image bytes of a data URL; InvalidRequest (400) or PayloadTooLarge (413) otherwise."""
    where = f"input {index}"
    if not isinstance(url, str):
        raise InvalidRequest(f"{where}: an image must be a data:image/png;base64,... or data:image/jpeg;base64,... URL")
    m = _DATA_URL.match(url)
    if m is None:
        if re.match(r"[a-z][a-z0-9+.-]*://", url, re.IGNORECASE):
            raise InvalidRequest(
                f"{where}: remote image URLs are not fetched; send the image inline as a data:image/...;base64, URL"
            )
        raise InvalidRequest(f"{where}: not an image data URL (expected data:image/png;base64,... or data:image/jpeg;base64,...)")
    mime = m.group("mime").lower()
    if mime not in FORMATS:
        raise InvalidRequest(f"{where}: unsupported image type {mime or '(none)'!r}; send image/png or image/jpeg")
    if "base64" not in [p.strip().lower() for p in m.group("params").split(";")]:
        raise InvalidRequest(f"{where}: the data URL must be base64-encoded (data:{mime};base64,...)")
    payload = url[m.end():]
    if len(payload) // 4 * 3 > limits.max_bytes + 2:  # checked before decoding anything
        raise PayloadTooLarge(f"{where}: the image is larger than the limit of {limits.max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: the image data is not valid base64") from None
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"{where}: the image has {len(data)} bytes, more than the limit of {limits.max_bytes}")
    decode_image(data, limits.max_pixels, where, FORMATS[mime])
    return data


def decode_image(data: bytes, max_pixels: int | None = None, where: str = "image", expect: str | None = None) -> Image.Image:
    """Decode PNG or JPEG bytes to an upright RGB image; InvalidRequest (400) when they are not
    one, are truncated or corrupt, are not of the `expect`ed format, or hold more than
    `max_pixels` pixels (checked from the header, before decoding)."""
    try:
        with warnings.catch_warnings():  # `max_pixels` is the bound; Pillow's own error stays a backstop
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
    except UnidentifiedImageError:
        raise InvalidRequest(f"{where}: not a PNG or JPEG image") from None
    except Image.DecompressionBombError:
        raise InvalidRequest(f"{where}: the image has too many pixels") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, struct.error... on a cut header
        raise InvalidRequest(f"{where}: the image is truncated or corrupt ({type(exc).__name__})") from None
    if expect is not None and img.format != expect:
        raise InvalidRequest(f"{where}: declared as {expect} but the data is a {img.format} image")
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidRequest(f"{where}: the image has {width}x{height} pixels, more than the limit of {max_pixels}")
    try:
        img.load()
        return ImageOps.exif_transpose(img).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises on the client's bytes is a 400
        raise InvalidRequest(f"{where}: the image is truncated or corrupt ({exc})") from None
