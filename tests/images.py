"""Images as the service's tests send and read them: encoded bytes, base64 text, pixels."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

__all__ = ["png_bytes", "rgb_of"]


def rgb_of(data: bytes | str) -> np.ndarray:
    """The RGB pixels of an encoded image, given as bytes or as base64 text (``b64_json``)."""
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def png_bytes(rgb: np.ndarray, alpha: np.ndarray | None = None) -> bytes:
    """A PNG of ``rgb`` (H, W, 3 uint8), with ``alpha`` (H, W) as its alpha channel if given."""
    image = Image.fromarray(rgb)
    if alpha is not None:
        image.putalpha(Image.fromarray(alpha))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
