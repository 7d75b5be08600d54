"""An embedded model sampled in full precision at its defaults: what bench commands compare to.

ref = fp_reference("dit-digits", n=64)
ref.fp.images, ref.fp.latents       # 64 images, seed 0, the same seeds as ``evaluate``
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.data import Target
from models.targets import conditions_for, evaluation_targets
from pipelines.generate import Samples, sample
from pipelines.loader import read_defaults
from quantization.artifact import open_source
from quantization.blocks import denoiser_attr
from quantization.calibration import Conditions, resolve_conditions

__all__ = ["Reference", "fp_reference"]

MODELS = Path(__file__).resolve().parents[1] / "models"


@dataclass
class Reference:
    pipe: object
    attr: str  # "transformer" or "unet"
    denoiser: torch.nn.Module  # the FP denoiser
    sampling: dict  # num_inference_steps and guidance_scale of the model's defaults
    targets: list[Target]
    conditions: list
    fp: Samples
    calibration: Conditions  # what calibration and measuring ask (the digits data)


@torch.no_grad()
def fp_reference(model: str, n: int) -> Reference:
    """Load models/<model>, and sample n evaluation targets in FP with seed 0."""
    folder = MODELS / model
    d = read_defaults(folder)
    sampling = {
        "num_inference_steps": d["num_inference_steps"],
        "guidance_scale": d["guidance_scale"],
    }
    pipe = open_source(folder)
    attr = denoiser_attr(pipe)
    targets = evaluation_targets(n, with_colors=d["kind"] == "text-to-image", seed=0)
    conditions = conditions_for(pipe, targets)
    fp = sample(pipe, conditions, seed=0, **sampling)
    given = resolve_conditions(pipe, folder)
    return Reference(pipe, attr, getattr(pipe, attr), sampling, targets, conditions, fp, given)
