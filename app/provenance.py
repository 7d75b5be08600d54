"""What made an image, written into the image: enough to make it again, and which quantized
artifact made it.

PNG keeps the parameters in a text chunk, JPEG and WebP in the EXIF ImageDescription tag; both
hold the same JSON object under ``parameters``. ``T2I_IMAGE_METADATA=none`` leaves images bare.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Protocol

from PIL import Image, PngImagePlugin

from app.queue.records import JobRequest

__all__ = ["KEY", "image_parameters", "read_parameters", "save_options"]

KEY = "parameters"
_DESCRIPTION = 0x010E  # EXIF ImageDescription (ASCII: the JSON is written ASCII-escaped)


class _Pinned(Protocol):  # an adapter, as read or as the registry lists it
    @property
    def sha256(self) -> str: ...


def image_parameters(
    request: JobRequest, index: int, made_by: dict, adapters: Mapping[str, _Pinned] | None = None
) -> dict:
    """Image ``index`` of a job: its request as it ran (seed + index) and what ran it
    (``made_by``: model, variant, scheduler, and for an artifact its recipe and sha256; each
    LoRA adapter applied with its scale and the sha256 of its file, from ``adapters``)."""
    parameters = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": request.seed + index,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "size": f"{request.width}x{request.height}",
        **made_by,
    }
    if request.scheduler is not None:  # else the folder's own, which made_by names
        parameters["scheduler"] = request.scheduler
    if request.lora:
        assert adapters is not None, "a job with LoRA needs the adapters that ran it"
        parameters["lora"] = [
            {"name": name, "scale": scale, "sha256": adapters[name].sha256}
            for name, scale in request.lora
        ]
    if request.image is not None:  # an edit: what it started from
        parameters.update(strength=request.strength, image_sha256=request.image)
        if request.mask is not None:
            parameters["mask_sha256"] = request.mask
    return parameters


def save_options(output_format: str, parameters: dict | None) -> dict:
    """Keyword arguments of ``PIL.Image.save`` that carry ``parameters`` in that format."""
    if parameters is None:
        return {}
    text = json.dumps(parameters, ensure_ascii=True, sort_keys=True)
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text(KEY, text)
        return {"pnginfo": info}
    exif = Image.Exif()
    exif[_DESCRIPTION] = f"{KEY}: {text}"
    return {"exif": exif.tobytes()}


def read_parameters(data: bytes) -> dict | None:
    """The parameters an encoded image carries, or None."""
    image = Image.open(io.BytesIO(data))
    text = image.info.get(KEY) if image.format == "PNG" else None
    if text is None:
        description = image.getexif().get(_DESCRIPTION)
        if isinstance(description, str) and description.startswith(f"{KEY}: "):
            text = description.removeprefix(f"{KEY}: ")
    return None if text is None else json.loads(text)
