"""Adapter files in the original models' naming, converted by diffusers' own converters:
kohya's LDM/SGM UNet naming (SDXL as kohya-ss trains it) and Flux.1's BFL naming (from kohya,
ComfyUI and XLabs). Each is read to the layers written here from the models' known mappings,
passes ``check``, and applied beside the layers gives the output of a copy whose weights have
``W += alpha / rank · B A`` merged in by hand (a fused qkv's B split into q, k and v rows)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

from pipelines import lora

RANK, ALPHA = 4, 3.0  # scale alpha / rank = 0.75
TEXT_ENCODER = "text-encoder LoRA is not supported"

# kohya stem in the LDM/SGM naming -> the diffusers module, with layers_per_block=2 (SD 1.5,
# SDXL): input_blocks 1, 2 are down_blocks.0's layers and 3 its downsampler; 4, 5 down_blocks.1;
# output_blocks 0-2 up_blocks.0 (its upsampler the third part of 2), 3-5 up_blocks.1
SGM_2 = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding.linear_1",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_2_0_emb_layers_1": "down_blocks.0.resnets.1.time_emb_proj",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_4_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_5_1_transformer_blocks_1_attn1_to_q": (
        "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_q"
    ),
    "middle_block_1_transformer_blocks_0_attn2_to_k": (
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    ),
    "middle_block_1_transformer_blocks_1_attn1_to_out_0": (
        "mid_block.attentions.0.transformer_blocks.1.attn1.to_out.0"
    ),
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_1_1_transformer_blocks_0_ff_net_0_proj": (
        "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj"
    ),
    "output_blocks_2_1_proj_out": "up_blocks.0.attentions.2.proj_out",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_3_0_skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
    "output_blocks_5_0_in_layers_2": "up_blocks.1.resnets.2.conv1",
    "out_2": "conv_out",
}
# the same UNet with layers_per_block=1: input_blocks 1 is down_blocks.0, 2 its downsampler,
# 3 down_blocks.1; output_blocks 0-1 up_blocks.0, 2-3 up_blocks.1
SGM_1 = {
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_3_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_3_1_transformer_blocks_1_attn1_to_q": (
        "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"
    ),
    "middle_block_1_transformer_blocks_0_attn2_to_k": (
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    ),
    "output_blocks_1_1_proj_out": "up_blocks.0.attentions.1.proj_out",
    "output_blocks_1_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_2_0_skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
}

D, S = "transformer_blocks.0", "single_transformer_blocks.0"
# a Flux.1 module in BFL's naming -> the diffusers modules its output rows are, in order
FLUX = {
    "double_blocks.0.img_attn.qkv": [f"{D}.attn.to_q", f"{D}.attn.to_k", f"{D}.attn.to_v"],
    "double_blocks.0.txt_attn.qkv": [
        f"{D}.attn.add_q_proj",
        f"{D}.attn.add_k_proj",
        f"{D}.attn.add_v_proj",
    ],
    "double_blocks.0.img_attn.proj": [f"{D}.attn.to_out.0"],
    "double_blocks.0.txt_attn.proj": [f"{D}.attn.to_add_out"],
    "double_blocks.0.img_mlp.0": [f"{D}.ff.net.0.proj"],
    "double_blocks.0.txt_mlp.2": [f"{D}.ff_context.net.2"],
    "double_blocks.0.img_mod.lin": [f"{D}.norm1.linear"],
    "single_blocks.0.linear2": [f"{S}.proj_out"],
    "single_blocks.0.modulation.lin": [f"{S}.norm.linear"],
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
}
# XLabs' processor LoRAs (no alpha): qkv_lora1 / proj_lora1 the image stream's, 2 the text's
XLABS = {
    "double_blocks.0.processor.qkv_lora1": FLUX["double_blocks.0.img_attn.qkv"],
    "double_blocks.0.processor.proj_lora1": [f"{D}.attn.to_out.0"],
    "double_blocks.0.processor.qkv_lora2": FLUX["double_blocks.0.txt_attn.qkv"],
    "double_blocks.0.processor.proj_lora2": [f"{D}.attn.to_add_out"],
    "single_blocks.0.processor.qkv_lora": [f"{S}.attn.to_q", f"{S}.attn.to_k", f"{S}.attn.to_v"],
    "single_blocks.0.processor.proj_lora": [f"{S}.proj_out"],
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the fastest for these tiny models, and steady on a busy 2-core
    machine, where two threads spinning against other processes made a call 100× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unet(layers_per_block: int) -> UNet2DConditionModel:
    """A tiny SDXL-shaped UNet: no attention in the first block, two transformer blocks."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def _flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def _unet_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([500, 20]),
        "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
    }


def _flux_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(2, 6, 32, generator=g),
        "pooled_projections": torch.randn(2, 32, generator=g),
        "timestep": torch.tensor([0.9, 0.3]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(6, 3),
    }


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    weight = model.get_submodule(name).weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _pairs(model: nn.Module, table: dict[str, list[str]], seed: int = 0) -> dict[str, tuple]:
    """Random A, B for each source module of ``table``: A for the input its diffusers modules
    share (a conv's with its kernel), B with their output rows stacked (a conv's 1×1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for source, names in table.items():
        weights = [_weight(model, n) for n in names]
        w = weights[0]
        rows = sum(int(v.shape[0]) for v in weights)
        a = torch.randn(RANK, *w.shape[1:], generator=g) / w.shape[1] ** 0.5
        b = torch.randn(rows, RANK, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.2
        out[source] = (a, b)
    return out


def _merged(model: nn.Module, table: dict[str, list[str]], pairs: dict, scale: float):
    """A copy of ``model`` with ``W += scale · B A`` in the weights, B's rows split in order."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for source, names in table.items():
            a, b = (t.double() for t in pairs[source])
            row = 0
            for name in names:
                w = _weight(merged, name)
                part = b[row : row + w.shape[0]]
                row += w.shape[0]
                delta = (
                    part @ a if w.dim() == 2 else torch.einsum("or,rikl->oikl", part[..., 0, 0], a)
                )
                w.copy_((w.double() + scale * delta).float())
            assert row == b.shape[0]
    return merged


def _save(path, tensors: dict[str, torch.Tensor]):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _kohya(pairs: dict, stem, alpha: float | None = ALPHA) -> dict[str, torch.Tensor]:
    """kohya's keys for ``pairs``, its stems made by ``stem(source)``."""
    tensors = {}
    for source, (a, b) in pairs.items():
        tensors[f"{stem(source)}.lora_down.weight"] = a
        tensors[f"{stem(source)}.lora_up.weight"] = b
        if alpha is not None:
            tensors[f"{stem(source)}.alpha"] = torch.tensor(alpha)
    return tensors


def _assert_applies_as_merged(model, adapter, merged, inputs) -> None:
    with torch.no_grad():
        base = model(**inputs).sample
        want = merged(**inputs).sample
        lora.attach(model, adapter.max_rank, adapter.layers)
        lora.set_adapters(model, [(adapter, 1.0)])
        got = model(**inputs).sample
    assert (want - base).abs().max() > 1e-2  # the adapter changes the output
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize(("layers_per_block", "sgm"), [(2, SGM_2), (1, SGM_1)])
def test_kohya_sgm_file_reads_to_the_unet_layers_and_applies_as_merged(
    tmp_path, layers_per_block, sgm
):
    unet = _unet(layers_per_block)
    table = {f"lora_unet_{stem}": [name] for stem, name in sgm.items()}
    pairs = _pairs(unet, table)
    path = _save(tmp_path / "sdxl-style.safetensors", _kohya(pairs, stem=str))

    adapter = lora.read(path, config=unet.config)

    assert adapter.layout == "kohya-sgm"
    assert {n: layer.key for n, layer in adapter.layers.items()} == {
        names[0]: stem for stem, names in table.items()
    }
    lora.check(adapter, unet)
    merged = _merged(unet, table, pairs, ALPHA / RANK)
    _assert_applies_as_merged(unet, adapter, merged, _unet_inputs())


def _flux_kohya_stem(source: str) -> str:
    return "lora_unet_" + source.replace(".", "_")


def _comfyui_stem(source: str) -> str:
    return "diffusion_model." + source


@pytest.mark.parametrize(
    ("style", "table", "stem", "alpha"),
    [
        ("kohya", FLUX, _flux_kohya_stem, ALPHA),
        ("comfyui", FLUX, _comfyui_stem, ALPHA),
        ("xlabs", XLABS, None, None),
    ],
)
def test_flux_bfl_named_file_reads_to_the_transformer_layers_and_applies_as_merged(
    tmp_path, style, table, stem, alpha
):
    flux = _flux()
    pairs = _pairs(flux, table)
    if style == "xlabs":
        tensors = {}
        for source, (a, b) in pairs.items():
            tensors[f"{source}.down.weight"], tensors[f"{source}.up.weight"] = a, b
        stems = {source: source for source in table}
    else:
        tensors = _kohya(pairs, stem, alpha)
        stems = {source: stem(source) for source in table}
    path = _save(tmp_path / f"flux-{style}.safetensors", tensors)

    adapter = lora.read(path)  # Flux's naming converts without the transformer's config

    assert adapter.layout == ("xlabs-flux" if style == "xlabs" else "kohya-flux")
    assert {n: layer.key for n, layer in adapter.layers.items()} == {
        name: stems[source] for source, names in table.items() for name in names
    }
    fused = adapter.layers[f"{D}.attn.to_q"]
    assert fused.down is adapter.layers[f"{D}.attn.to_k"].down  # one A, three B
    lora.check(adapter, flux)
    scale = 1.0 if alpha is None else alpha / RANK
    _assert_applies_as_merged(flux, adapter, _merged(flux, table, pairs, scale), _flux_inputs())


def test_flux_single_block_linear1_splits_at_flux1_widths(tmp_path):
    """linear1 (q, k, v and the MLP's input in one) converts at Flux.1's widths, the ones
    diffusers' converter knows: checked on Flux.1's shapes on the meta device (no weights)."""
    with torch.device("meta"):
        flux = FluxTransformer2DModel(num_layers=1, num_single_layers=1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(RANK, 3072, generator=g), torch.randn(3 * 3072 + 12288, RANK, generator=g)
    stem = "lora_unet_single_blocks_0_linear1"
    path = _save(tmp_path / "linear1.safetensors", _kohya({stem: (a, b)}, str))

    adapter = lora.read(path)

    lora.check(adapter, flux)
    names = [f"{S}.attn.to_q", f"{S}.attn.to_k", f"{S}.attn.to_v", f"{S}.proj_mlp"]
    assert list(adapter.layers) == names
    assert torch.equal(torch.cat([adapter.layers[n].up for n in names]), b)
    assert all(torch.equal(adapter.layers[n].down, a) for n in names)
    assert all(adapter.layers[n].scale == ALPHA / RANK for n in names)


def test_flux_linear1_at_other_widths_is_refused_naming_the_file(tmp_path):
    """diffusers splits linear1 at Flux.1's widths only (3 × 3072 + 12288 rows)."""
    stem = "lora_unet_single_blocks_0_linear1"
    a, b = torch.randn(RANK, 32), torch.randn(3 * 32 + 128, RANK)  # the tiny Flux's widths
    path = _save(tmp_path / "tiny.safetensors", _kohya({stem: (a, b)}, str))
    with pytest.raises(
        lora.AdapterError, match=f"{re.escape(str(path))}: {stem}.lora_down.weight: diffusers"
    ):
        lora.read(path)


def test_sdxl_style_key_with_a_wrong_shape_is_refused_naming_the_file(tmp_path):
    unet = _unet(2)
    stem = "lora_unet_input_blocks_4_1_proj_in"
    a, b = torch.randn(RANK, 640, 1, 1), torch.randn(640, RANK, 1, 1)  # SDXL's width, not 64
    path = _save(tmp_path / "sdxl.safetensors", _kohya({stem: (a, b)}, str))
    adapter = lora.read(path, config=unet.config)
    assert list(adapter.layers) == ["down_blocks.1.attentions.0.proj_in"]
    with pytest.raises(lora.AdapterError, match=f"{re.escape(str(path))}: {stem}: shape mismatch"):
        lora.check(adapter, unet)


def test_sgm_names_need_the_unets_config(tmp_path):
    stem = "lora_unet_input_blocks_4_1_proj_in"
    a, b = torch.randn(RANK, 64, 1, 1), torch.randn(64, RANK, 1, 1)
    path = _save(tmp_path / "sdxl.safetensors", _kohya({stem: (a, b)}, str))
    with pytest.raises(lora.AdapterError, match=f"{re.escape(str(path))}: {stem}.*config"):
        lora.read(path)


@pytest.mark.parametrize(
    ("kind", "stem", "message"),
    [
        ("sgm", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", TEXT_ENCODER),
        ("flux", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", TEXT_ENCODER),
        (
            "flux",
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1",
            TEXT_ENCODER,
        ),
        ("flux", "lora_unet_double_blocks_0_img_attn_norm", "diffusers cannot convert it"),
    ],
)
def test_keys_no_denoiser_layer_stands_for_are_refused_naming_the_file(
    tmp_path, kind, stem, message
):
    """A text encoder's keys in an SDXL or Flux file, and a Flux key diffusers does not map."""
    a, b = torch.randn(RANK, 64), torch.randn(64, RANK)
    layer = "lora_unet_input_blocks_4_1_proj_in" if kind == "sgm" else "lora_unet_img_in"
    pairs = {layer: (a, b), stem: (a.clone(), b.clone())}
    path = _save(tmp_path / f"{kind}.safetensors", _kohya(pairs, str))
    config = _unet(2).config if kind == "sgm" else None
    with pytest.raises(lora.AdapterError, match=f"{re.escape(str(path))}: {stem}.*{message}"):
        lora.read(path, config=config)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["model.blocks.0.down.weight", "model.blocks.0.up.weight"], "outside an XLabs processor"),
        (
            ["double_blocks.0.processor.proj_lora1.down.weight", "lora_unet_img_in.lora_up.weight"],
            "mixes layouts",
        ),
        (["lora_unet_input_blocks_4_1_proj_in.hada_w1_a"], "not a LoRA key"),
    ],
)
def test_unknown_layouts_are_refused_naming_the_file(tmp_path, keys, message):
    path = _save(tmp_path / "odd.safetensors", {key: torch.zeros(2, 2) for key in keys})
    with pytest.raises(lora.AdapterError, match=f"{re.escape(str(path))}: .*{message}"):
        lora.read(path)
