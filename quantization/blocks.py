"""Where the denoiser is in a pipeline, and how it splits into blocks and quantizable layers.

A block is a top-level child of the denoiser, with module lists expanded into their items:
DiT / PixArt ``transformer_blocks.i``, SD UNet ``down_blocks.i``, ``mid_block``, ``up_blocks.i``,
and the embeddings and output projections as blocks of their own (docs/quantization.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

__all__ = [
    "DENOISER_ATTRS",
    "UNITS",
    "Block",
    "denoiser_attr",
    "denoiser_swapped",
    "find_blocks",
    "quantizable_layers",
]

DENOISER_ATTRS = ("transformer", "unet")
UNITS = ("block", "module")  # what the SQNR-driven planner gives a precision level to
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


def quantizable_layers(
    module: nn.Module, prefix: str = "", kinds: tuple[type, ...] = QUANTIZABLE
) -> list[str]:
    """Dotted names of the layers of ``kinds`` under ``module`` (a backend's ``LAYERS``:
    Linear and Conv2d for quanto, Linear for torchao)."""
    return [
        ".".join(part for part in (prefix, name) if part)
        for name, m in module.named_modules()
        if isinstance(m, kinds)
    ]


def find_blocks(
    denoiser: nn.Module, kinds: tuple[type, ...] = QUANTIZABLE, unit: str = "block"
) -> list[Block]:
    """The denoiser's blocks in forward order of definition, each with its layers of
    ``kinds``; a block with none is left out.

    ``unit="module"`` splits every block into its modules: the layers grouped by the module
    that holds them (a list or sequence counts as its owner), e.g. DiT's ``attn1`` (q, k, v,
    out), ``ff.net.0`` (up-projection), ``ff`` (down-projection), ``norm1`` (adaLN) and
    ``norm1.emb.timestep_embedder``; a UNet's resnets and attention sublayers likewise.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, not {unit!r}")
    blocks = _blocks(denoiser, kinds)
    if unit == "block":
        return blocks
    return [m for b in blocks for m in _modules_of(denoiser, b)]


def _modules_of(denoiser: nn.Module, block: Block) -> list[Block]:
    groups: dict[str, list[str]] = {}
    for layer in block.layers:
        owner = layer.rpartition(".")[0]
        while owner != block.name and isinstance(
            denoiser.get_submodule(owner), nn.ModuleList | nn.Sequential
        ):
            owner = owner.rpartition(".")[0]
        groups.setdefault(owner or layer, []).append(layer)
    order = {name: i for i, (name, _) in enumerate(denoiser.named_modules())}
    return [
        Block(name, tuple(sorted(layers)))
        for name, layers in sorted(groups.items(), key=lambda kv: order.get(kv[0], 0))
    ]


def _blocks(denoiser: nn.Module, kinds: tuple[type, ...]) -> list[Block]:
    blocks = []
    for name, child in denoiser.named_children():
        items = (
            [(f"{name}.{i}", sub) for i, sub in enumerate(child)]
            if isinstance(child, nn.ModuleList)
            else [(name, child)]
        )
        for block_name, module in items:
            layers = quantizable_layers(module, block_name, kinds)
            if layers:
                blocks.append(Block(block_name, tuple(sorted(layers))))
    return blocks
