"""Where the denoiser is in a pipeline, and how it splits into blocks and quantizable layers.

A block is a top-level child of the denoiser, with module lists expanded into their items:
DiT / PixArt ``transformer_blocks.i``, SD UNet ``down_blocks.i``, ``mid_block``, ``up_blocks.i``,
and the embeddings and output projections as blocks of their own (METHOD.md, "Block").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

__all__ = [
    "DENOISER_ATTRS",
    "Block",
    "denoiser_attr",
    "denoiser_swapped",
    "find_blocks",
    "quantizable_layers",
]

DENOISER_ATTRS = ("transformer", "unet")
QUANTIZABLE = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Block:
    name: str
    layers: tuple[str, ...]  # full dotted names of the Linear / Conv2d layers inside


def denoiser_attr(pipe) -> str:
    """The pipeline attribute holding the denoiser: "transformer" (DiT, PixArt) or "unet" (SD)."""
    for attr in DENOISER_ATTRS:
        if isinstance(getattr(pipe, attr, None), nn.Module):
            return attr
    raise TypeError(f"{type(pipe).__name__} has no transformer or unet to quantize")


@contextmanager
def denoiser_swapped(pipe, denoiser: nn.Module) -> Iterator[None]:
    """Inside, ``pipe`` samples with ``denoiser`` (e.g. a quantized copy); its own one after."""
    attr = denoiser_attr(pipe)
    original = getattr(pipe, attr)
    setattr(pipe, attr, denoiser)
    try:
        yield
    finally:
        setattr(pipe, attr, original)


def quantizable_layers(module: nn.Module, prefix: str = "") -> list[str]:
    """Dotted names of the Linear and Conv2d layers under ``module`` (the ones quanto swaps)."""
    return [
        ".".join(part for part in (prefix, name) if part)
        for name, m in module.named_modules()
        if isinstance(m, QUANTIZABLE)
    ]


def find_blocks(denoiser: nn.Module) -> list[Block]:
    """The denoiser's blocks in forward order of definition, each with its quantizable layers."""
    blocks = []
    for name, child in denoiser.named_children():
        items = (
            [(f"{name}.{i}", sub) for i, sub in enumerate(child)]
            if isinstance(child, nn.ModuleList)
            else [(name, child)]
        )
        for block_name, module in items:
            layers = quantizable_layers(module, block_name)
            if layers:
                blocks.append(Block(block_name, tuple(sorted(layers))))
    return blocks
