"""Tiny denoisers and pipelines built from configs (random weights, seeded), and inputs for them."""

from __future__ import annotations

import torch
from diffusers import (
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
)

from models import architectures
from models.data import digit_id2label
from quantization.capture import Call


def dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=64,  # 128 wide: room for int4 groups of 32 / 64
        in_channels=4,
        out_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()


def pixart() -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=32,
        num_attention_heads=2,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=64,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()


def sd_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
    ).eval()


def calls(kind: str, steps=(999, 500, 50), batch: int = 4) -> list[Call]:
    """Denoiser inputs at a few timesteps, as a sampler would pass them."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i, t in enumerate(steps):
        x = torch.randn(batch, 4, 8, 8, generator=g)
        timestep = torch.full((batch,), t)
        if kind == "dit":
            kwargs = {"timestep": timestep, "class_labels": torch.arange(batch) % 10}
        elif kind == "pixart":
            kwargs = {
                "timestep": timestep,
                "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
            }
        else:
            kwargs = {
                "timestep": timestep,
                "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g),
            }
        out.append(Call(i, (x,), kwargs))
    return out


def dit_pipeline() -> DiTPipeline:
    torch.manual_seed(0)
    pipe = DiTPipeline(
        transformer=dit(),
        vae=architectures.vae().eval(),
        scheduler=DPMSolverMultistepScheduler(),
        id2label={int(k): v for k, v in digit_id2label().items()},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
