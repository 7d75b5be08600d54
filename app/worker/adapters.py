"""A model's LoRA adapters in a worker (pipelines.lora does the maths).

``read_all`` reads every adapter a model lists, each pinned by its sha256, and checks it
against the model's denoiser built on the meta device (its layers and shapes, no weights),
at the worker's start: a tampered or mismatched file stops the worker, naming the file.
``attach`` gives a variant's denoiser room for the model's adapters, before it is compiled;
``apply`` makes a batch's adapter set the active one (a copy into fixed buffers, so a
compiled denoiser does not recompile). Two float variants of one dtype share their denoiser
(app.worker.components): it is attached once, and the set in its buffers is kept per module,
not per variant.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch

from app.registry import ModelSpec
from pipelines import lora

__all__ = ["Adapters", "apply", "attach", "read_all"]

Adapters = Mapping[str, lora.Adapter]
Chosen = tuple[tuple[str, float], ...]  # JobRequest.lora: (name, scale), in order

# the adapter set in each attached denoiser's buffers (absent: none)
_ACTIVE: weakref.WeakKeyDictionary[torch.nn.Module, Chosen] = weakref.WeakKeyDictionary()


def read_all(spec: ModelSpec, folder: Path) -> dict[str, lora.Adapter]:
    """The adapters of ``spec`` read and checked against its denoiser's structure (the model
    as its pipeline ``folder`` describes it); ``lora.AdapterError`` naming the file for a
    damaged file, other bytes than the pinned sha256, or layers the model lacks."""
    if not spec.adapters:
        return {}
    skeleton = _skeleton(folder)
    config = cast(Mapping[str, Any], skeleton.config)  # places kohya's LDM/SGM blocks
    adapters = {
        name: lora.read(entry.file, name, entry.sha256, config=config)
        for name, entry in spec.adapters.items()
    }
    for adapter in adapters.values():
        try:
            lora.check(adapter, skeleton)
        except lora.AdapterError as exc:
            raise lora.AdapterError(f"{exc} (is it an adapter of {spec.name}?)") from None
    return adapters


def _skeleton(folder: Path) -> torch.nn.Module:
    """The pipeline's denoiser with its configuration and no weights (meta tensors)."""
    import diffusers

    sub = next(s for s in ("transformer", "unet") if (folder / s / "config.json").is_file())
    config = json.loads((folder / sub / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        return cls.from_config(config)


def attach(
    denoiser: torch.nn.Module,
    adapters: Adapters,
    max_lora: int,
    dtype: torch.dtype,
    compiled: bool = False,
) -> int:
    """Wrap the layers any of ``adapters`` names, with room for the ranks of the
    ``max_lora`` largest together; returns that rank (0: no adapters, nothing wrapped).
    An eager denoiser's branches are gated (skipped where no active adapter is: a plain
    request costs what it did); a ``compiled`` one's always run, so that switching adapters
    never recompiles. A denoiser attached already (shared with another variant) keeps its
    branches, ungated when this variant compiles it."""
    if not adapters:
        return 0
    attached = [m for m in denoiser.modules() if isinstance(m, lora.LoRALayer)]
    if attached:
        for layer in attached:
            layer.gated = layer.gated and not compiled
        return attached[0].max_rank
    ranks = sorted((a.max_rank for a in adapters.values()), reverse=True)
    max_rank = sum(ranks[:max_lora])
    targets = {name for a in adapters.values() for name in a.layers}
    lora.attach(denoiser, max_rank, targets, dtype, gated=not compiled)
    return max_rank


def apply(denoiser: torch.nn.Module, adapters: Adapters, chosen: Chosen) -> None:
    """Make ``chosen`` the active set of an attached denoiser; nothing is written when it is
    the set in place already."""
    module = getattr(denoiser, "_orig_mod", denoiser)  # torch.compile's wrapper: the model
    if _ACTIVE.get(module, ()) == chosen:
        return
    lora.set_adapters(module, [(adapters[name], scale) for name, scale in chosen])
    _ACTIVE[module] = chosen
