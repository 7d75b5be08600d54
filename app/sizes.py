"""Image sizes as the registry and the wire write them, ``"WxH"``, parsed in one place.

Torch-free: the API process, the registry and the workers all read sizes through here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Size", "parse_size"]

_WXH = re.compile(r"([1-9][0-9]*)[xX]([1-9][0-9]*)")


@dataclass(frozen=True)
class Size:
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def parse_size(text: str) -> Size:
    """``"512x768"`` (or ``"512X768"``) as a Size; ValueError for anything else, a zero side
    included."""
    match = _WXH.fullmatch(text)
    if match is None:
        raise ValueError(f"size {text!r} is not WxH")
    return Size(int(match[1]), int(match[2]))
