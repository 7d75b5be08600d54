"""An edit's input image and mask, checked and brought to the output size before they are
queued (PIL only: the API never imports torch).

OpenAI's mask convention: the mask is an image of the input's size whose fully transparent
pixels (alpha 0) mark what is painted anew. What is queued is the image as RGB PNG and the
mask as an 8-bit PNG, white where the image is painted anew (diffusers' convention), both at
the output size; each is named by the sha256 of its bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from app.errors import InvalidRequest

__all__ = ["FORMATS", "MAX_PIXELS", "Upload", "decode_base64", "open_image", "prepare"]

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_PIXELS = 4096 * 4096  # larger inputs are refused before they are decoded


@dataclass(frozen=True)
class Upload:
    data: bytes  # PNG
    sha256: str


def decode_base64(value: str, param: str) -> bytes:
    """Bytes of a base64 string or a ``data:image/...;base64,`` URL."""
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise InvalidRequest(f"{param}: a data URL must be base64", param=param)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{param} is not valid base64", param=param) from None


def _open(data: bytes, param: str) -> Image.Image:
    if not data:
        raise InvalidRequest(f"{param} is empty", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise InvalidRequest(
                    f"{param} is {image.format}; send PNG, JPEG or WebP", param=param
                )
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise InvalidRequest(
                    f"{param} is {width}x{height}; at most {MAX_PIXELS} pixels", param=param
                )
            image.load()
    except InvalidRequest:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        # PIL refuses sizes far past MAX_PIXELS while it opens the file, before we can look
        raise InvalidRequest(
            f"{param} has too many pixels; at most {MAX_PIXELS}", param=param
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidRequest(f"{param} is not a readable image ({exc})", param=param) from None
    return image


def _png(image: Image.Image) -> Upload:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    return Upload(data, hashlib.sha256(data).hexdigest())


def open_image(data: bytes) -> Image.Image:
    """The input image, decoded once, or 400 naming `image`."""
    return _open(data, "image")


def prepare(
    picture: Image.Image, mask: bytes | None, width: int, height: int
) -> tuple[Upload, Upload | None]:
    """The input image (``open_image``'s; RGB, resized to width x height if it is another
    size) and the mask (white = paint anew), or 400 naming what is wrong with them."""
    rgb = picture.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    if mask is None:
        return _png(rgb), None
    shape = _open(mask, "mask")
    if shape.size != picture.size:
        raise InvalidRequest(
            f"the mask is {shape.size[0]}x{shape.size[1]} and the image "
            f"{picture.size[0]}x{picture.size[1]}; they must be the same size",
            param="mask",
        )
    if "A" not in shape.getbands() and "transparency" not in shape.info:
        raise InvalidRequest(
            "the mask has no alpha channel: its fully transparent pixels mark what is edited",
            param="mask",
        )
    alpha = shape.convert("RGBA").getchannel("A")
    paint = alpha.point(lambda a: 255 if a == 0 else 0).convert("L")
    if paint.size != (width, height):
        paint = paint.resize((width, height), Image.Resampling.NEAREST)
    if paint.getextrema()[1] == 0:
        raise InvalidRequest(
            "the mask has no fully transparent pixel: nothing to edit", param="mask"
        )
    return _png(rgb), _png(paint)
