"""Tiny random-weight pipelines of every family the service serves, built offline from configs:
SD 1.5, SDXL, SD3, Flux, PixArt-α, PixArt-Σ and DiT, each with its own pipeline class,
denoiser, text encoders, VAE (SD3's and Flux's with a shift factor) and sampler (flow matching
for SD3 and Flux). The CLIP tokenizer is the embedded models' vocabulary
(``models.tokenizer``); the T5 tokenizer is a Unigram over the same words. Prompts worth
giving them come from ``PROMPTS``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from models.tokenizer import build_tokenizer, caption_words
from tests import tiny

__all__ = ["FAMILIES", "PROMPTS", "build"]

PROMPTS = ("a red seven on a black background", "a green two on a black background")
WIDTH = 32  # CLIP's hidden size, T5's d_model


def build(family: str, folder: Path):
    """The tiny pipeline of ``family`` (seeded, eval mode); its tokenizer files go to
    ``folder`` (made), which ``save_pretrained`` may then fill."""
    torch.manual_seed(0)
    pipe = FAMILIES[family](Path(folder))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip(tokenizer: CLIPTokenizer, projection: bool = False):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,  # SDXL and SD3 take the penultimate layer's states
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=WIDTH,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5_tokenizer() -> T5Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -3.0) for w in caption_words()]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _t5(tokenizer: T5Tokenizer) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=WIDTH,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _vae(blocks: int, channels: int = 16, latent: int = 4, **scaling) -> AutoencoderKL:
    """2**(blocks - 1) times smaller latents of ``latent`` channels; ``scaling``:
    scaling_factor and shift_factor as SD3's and Flux's VAEs state them."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(channels,) * blocks,
        layers_per_block=1,
        latent_channels=latent,
        norm_num_groups=8,
        mid_block_add_attention=False,
        **scaling,
    )


def _sd_schedule(cls, **overrides):
    """A sampler of Stable Diffusion's noise schedule."""
    return cls(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        **overrides,
    )


def _sd15(folder: Path) -> StableDiffusionPipeline:
    tokenizer = build_tokenizer(folder / "clip")
    return StableDiffusionPipeline(
        vae=_vae(3),
        text_encoder=_clip(tokenizer),
        tokenizer=tokenizer,
        unet=tiny.sd_unet(),
        scheduler=_sd_schedule(DPMSolverMultistepScheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(folder: Path) -> StableDiffusionXLPipeline:
    tokenizer = build_tokenizer(folder / "clip")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + WIDTH,  # 6 size/crop ids + pooled text
        cross_attention_dim=2 * WIDTH,  # both encoders' states side by side
        norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(3),
        text_encoder=_clip(tokenizer),
        text_encoder_2=_clip(tokenizer, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_sd_schedule(EulerDiscreteScheduler),
        add_watermarker=False,
    )


def _sd3(folder: Path) -> StableDiffusion3Pipeline:
    tokenizer = build_tokenizer(folder / "clip")
    t5_tokenizer = _t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,  # SD3's inpainting takes 16-channel latents only
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_projection_dim=32,
        joint_attention_dim=WIDTH,  # T5's; the two CLIPs' states are cut to it
        pooled_projection_dim=2 * WIDTH,
        pos_embed_max_size=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(3, latent=16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip(tokenizer, projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, projection=True),
        tokenizer_2=tokenizer,
        text_encoder_3=_t5(t5_tokenizer),
        tokenizer_3=t5_tokenizer,
    )


def _flux(folder: Path) -> FluxPipeline:
    tokenizer = build_tokenizer(folder / "clip")
    t5_tokenizer = _t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 4,  # latents packed in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=WIDTH,
        pooled_projection_dim=WIDTH,
        guidance_embeds=False,
        axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(3, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=_t5(t5_tokenizer),
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def _pixart_transformer() -> PixArtTransformer2DModel:
    # sample size 32: PixArt's 256-pixel aspect-ratio bins (the pipeline bins the size asked)
    return PixArtTransformer2DModel(
        sample_size=32,
        num_layers=2,
        patch_size=2,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_channels=WIDTH,
        in_channels=4,
        out_channels=8,  # learned sigma
        cross_attention_dim=32,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def _pixart(cls):
    def make(folder: Path):
        tokenizer = _t5_tokenizer()
        return cls(
            tokenizer=tokenizer,
            text_encoder=_t5(tokenizer),
            vae=_vae(4, channels=8),  # 8x smaller: 256-pixel images in 32x32 latents
            transformer=_pixart_transformer(),
            scheduler=_sd_schedule(DPMSolverMultistepScheduler),
        )

    return make


def _dit(folder: Path):
    return tiny.dit_pipeline()


FAMILIES = {
    "sd15": _sd15,
    "sdxl": _sdxl,
    "sd3": _sd3,
    "flux": _flux,
    "pixart-alpha": _pixart(PixArtAlphaPipeline),
    "pixart-sigma": _pixart(PixArtSigmaPipeline),
    "dit": _dit,
}
