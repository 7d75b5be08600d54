"""LoRA adapters applied beside a denoiser's layers, never merged into them.

``read`` turns an adapter file (safetensors) into an ``Adapter`` keyed by the denoiser's
module names. Files named after diffusers' modules are read as they are: diffusers/PEFT
(``unet.<module>.lora_A.weight``) and kohya (``lora_unet_<module_with_underscores>``, through
``kohya_name``). Files named after the original models are converted by diffusers' own
``lora_state_dict`` converters, one layer at a time: kohya's LDM/SGM UNet naming, as kohya-ss
trains SDXL (``lora_unet_input_blocks_4_1_proj_in``: needs the UNet's ``config``), and Flux.1
in BFL's naming, from kohya (``lora_unet_double_blocks_0_img_attn_qkv``), ComfyUI
(``diffusion_model.double_blocks.0.…``) or XLabs (``double_blocks.0.processor.qkv_lora1``);
a fused qkv becomes three layers sharing A. ``check`` holds an adapter against a denoiser
(every key a Linear or Conv2d layer it has, ranks and shapes matching). ``attach`` wraps the
target layers once in ``LoRALayer``s that compute ``y = base(x) + B((A x) * s)``, where
``base`` is whatever module was there (float, or a quantized layer of any backend: its
weights are never read, dequantized or changed), and A, B and the per-rank scales ``s`` are
fixed-shape buffers (padded to ``max_rank``). ``set_adapters`` copies a set of adapters into
those buffers, stacked along the rank dimension, or zeroes them for none: a
``torch.compile``d denoiser takes the buffers as graph inputs and does not recompile when
the adapter changes. docs/lora.md has the layouts, the maths and the measured switch cost.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Adapter",
    "AdapterError",
    "LayerLoRA",
    "LoRALayer",
    "attach",
    "check",
    "detach",
    "kohya_name",
    "read",
    "set_adapters",
    "targets",
]

# the denoiser's prefix in a diffusers/PEFT file (a bare PEFT model: base_model.model.)
PEFT_PREFIXES = ("unet.", "transformer.", "base_model.model.")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
# text encoders' keys: PEFT (text_encoder., text_encoder_2.), kohya (lora_te_, lora_te1_, …),
# ComfyUI (text_encoders.clip_l.…)
TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te")
PARTS = {  # key suffix -> (layout, matrix)
    ".lora_A.weight": ("peft", "A"),
    ".lora_B.weight": ("peft", "B"),
    ".lora_down.weight": ("kohya", "A"),
    ".lora_up.weight": ("kohya", "B"),
    ".down.weight": ("xlabs-flux", "A"),  # XLabs' Flux LoRAs (…processor.qkv_lora1.down.weight)
    ".up.weight": ("xlabs-flux", "B"),
}
# kohya stems in the original models' naming, which diffusers converts (by what they contain)
SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")  # the LDM/SGM UNet (SDXL)
FLUX_BLOCKS = ("double_blocks", "single_blocks")  # Flux.1 as BFL names it
# module names of diffusers denoisers that contain "_": a kohya key joins every part of a
# module's name with "_", so these are rejoined (longest first) and every other "_" is a "."
KOHYA_WORDS = frozenset(
    (
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "single_transformer_blocks",
        "to_q", "to_k", "to_v", "to_out", "to_add_out", "add_q_proj", "add_k_proj", "add_v_proj",
        "proj_in", "proj_out", "proj_out_1", "proj_out_2", "proj_mlp", "time_emb_proj",
        "conv_shortcut", "conv_in", "conv_out", "time_embedding", "linear_1", "linear_2",
        "add_embedding", "encoder_hid_proj", "ff_context", "norm1_context", "norm_out",
        "time_text_embed", "timestep_embedder", "text_embedder", "guidance_embedder",
        "context_embedder", "x_embedder", "pos_embed", "caption_projection", "adaln_single",
    )
)  # fmt: skip


class AdapterError(ValueError):
    """An adapter file that cannot be read, or does not fit the denoiser; names the file."""


@dataclass(frozen=True)
class LayerLoRA:
    """One layer's low-rank pair: ``down`` (A: rank × in, or rank × in × kh × kw for a
    Conv2d) and ``up`` (B: out × rank, or out × rank × 1 × 1); its delta is
    ``alpha / rank · B A``."""

    key: str  # the file's key stem, for messages
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class Adapter:
    """An adapter file as read: its layers keyed by the denoiser's module names."""

    name: str
    path: str
    sha256: str
    layout: str  # "peft", "kohya", or converted: "kohya-sgm", "kohya-flux", "xlabs-flux"
    layers: dict[str, LayerLoRA]

    @property
    def max_rank(self) -> int:
        return max((layer.rank for layer in self.layers.values()), default=0)


def kohya_name(stem: str) -> str:
    """A kohya module stem (``down_blocks_0_attentions_0_proj_in``) as the module name it
    stands for (``down_blocks.0.attentions.0.proj_in``), through ``KOHYA_WORDS``."""
    tokens = stem.split("_")
    out, i = [], 0
    while i < len(tokens):
        for k in (3, 2):
            word = "_".join(tokens[i : i + k])
            if i + k <= len(tokens) and word in KOHYA_WORDS:
                out.append(word)
                i += k
                break
        else:
            out.append(tokens[i])
            i += 1
    return ".".join(out)


def _header_metadata(data: bytes) -> dict[str, str]:
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    return dict(header.get("__metadata__") or {})


def _file_alpha(path: str, metadata: dict[str, str]) -> float | None:
    """The alpha a file states for all its layers, if any: ``alpha`` in the metadata, or
    ``<prefix>.lora_alpha`` in diffusers' ``lora_adapter_metadata`` (PEFT's LoraConfig)."""
    if "alpha" in metadata:
        return float(metadata["alpha"])
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    config = json.loads(raw)
    for key, value in config.items():
        if key.endswith("alpha_pattern") and value:
            raise AdapterError(f"{path}: alpha per layer (alpha_pattern) is not supported")
    alphas = {v for k, v in config.items() if k.endswith("lora_alpha")}
    if len(alphas) > 1:
        raise AdapterError(f"{path}: several lora_alpha values in its metadata: {alphas}")
    return float(alphas.pop()) if alphas else None


def _layout(path: str, layout: str, keys: Sequence[str], config: Mapping[str, Any] | None) -> str:
    """The file's layout: the one its keys' suffixes name (``PARTS``), but ``kohya-flux`` or
    ``kohya-sgm`` for a kohya file in the original models' naming (this one only with the
    UNet's ``config``: its block numbers depend on ``layers_per_block``)."""
    if layout == "xlabs-flux":
        bare = next((k for k in keys if ".processor." not in k), None)
        if bare is not None:
            raise AdapterError(
                f"{path}: {bare}: not a LoRA key (down/up outside an XLabs processor)"
            )
    if layout != "kohya":
        return layout
    if any(block in key for key in keys for block in FLUX_BLOCKS):
        return "kohya-flux"
    sgm = next((key for key in keys if any(block in key for block in SGM_BLOCKS)), None)
    if sgm is None:
        return layout
    if config is None:
        raise AdapterError(
            f"{path}: {sgm}: kohya's LDM/SGM block names ({', '.join(SGM_BLOCKS)}) convert only "
            "with the UNet's config: read(..., config=unet.config)"
        )
    return "kohya-sgm"


def _targets(
    path: str,
    key: str,
    layout: str,
    stem: str,
    parts: dict[str, tuple[str, torch.Tensor]],
    config: Mapping[str, Any] | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The denoiser's layers that one A/B pair of the file stands for, each with its A and B:
    one for the layouts named after diffusers' modules; what diffusers' ``lora_state_dict``
    converters make of the pair for the others (a fused qkv: to_q, to_k and to_v with A shared
    and B split, or A split too where B is block-diagonal)."""
    if stem.startswith(TEXT_ENCODER_PREFIXES):
        raise AdapterError(f"{path}: {key}: text-encoder LoRA is not supported")
    pair = (parts["A"][1], parts["B"][1])
    if layout == "peft":
        peft_prefix = next((p for p in PEFT_PREFIXES if stem.startswith(p)), "")
        return {stem[len(peft_prefix) :]: pair}
    if layout == "kohya":
        kohya_prefix = next((p for p in KOHYA_PREFIXES if stem.startswith(p)), None)
        if kohya_prefix is None:
            raise AdapterError(
                f"{path}: {key}: a kohya key must start with {' or '.join(KOHYA_PREFIXES)}"
            )
        return {kohya_name(stem[len(kohya_prefix) :]): pair}

    from diffusers.loaders import FluxLoraLoaderMixin, StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft

    state = dict(parts.values())  # without its alpha: read applies alpha / rank to every part
    try:
        if layout == "kohya-sgm":
            assert config is not None  # _layout refused the file without one
            state, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(
                state, unet_config=SimpleNamespace(**config)
            )
            state = convert_unet_state_dict_to_peft(state)  # processor.to_q_lora.down: to_q.lora_A
        else:
            state = FluxLoraLoaderMixin.lora_state_dict(state)
    except Exception as e:  # diffusers' ValueError, KeyError or assert on a pair it cannot map
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise AdapterError(f"{path}: {key}: diffusers cannot convert it ({why})") from None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for converted, tensor in state.items():
        module, _, matrix = converted.removesuffix(".weight").rpartition(".")
        for prefix in PEFT_PREFIXES:
            module = module.removeprefix(prefix)
        if matrix not in ("lora_A", "lora_B") or module.startswith(TEXT_ENCODER_PREFIXES):
            raise AdapterError(f"{path}: {key}: diffusers converts it to {converted}")
        out.setdefault(module, {})[matrix] = tensor
    if not out:
        raise AdapterError(f"{path}: {key}: diffusers' converter drops it")
    return {module: (ab["lora_A"], ab["lora_B"]) for module, ab in out.items()}


def read(
    path: str | Path,
    name: str | None = None,
    sha256: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> Adapter:
    """Read an adapter file. ``sha256``, when given, must be the file's: a registry pins it,
    as only the hash catches every flipped byte (one in the tensors reads as other numbers;
    one in the header mostly breaks its JSON or offsets, but may rename a key).

    Alpha per layer: its ``<stem>.alpha`` tensor, else the file's metadata (``alpha``, or
    PEFT's ``lora_alpha`` in diffusers' ``lora_adapter_metadata``), else the rank (scale 1,
    as diffusers loads a file that states none). A ``rank`` in the metadata must be every
    layer's rank. The layers diffusers converts a pair into keep its scale ``alpha / rank``.

    Args:
        config: the denoiser's config (``unet.config``); needed only for kohya files in the
            LDM/SGM naming, whose block numbers depend on its ``layers_per_block``.
    """
    from safetensors.torch import load as load_bytes

    path = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise AdapterError(f"{path}: cannot read the adapter file ({e})") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise AdapterError(f"{path}: sha256 is {digest}, the registry expects {sha256}")
    try:
        tensors = load_bytes(data)
        metadata = _header_metadata(data)
    except Exception as e:  # safetensors' own errors, a bad header, bad JSON
        raise AdapterError(f"{path}: not a valid safetensors file ({e})") from None
    if not tensors:
        raise AdapterError(f"{path}: holds no tensors")
    file_alpha = _file_alpha(path, metadata)

    layouts: set[str] = set()
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # stem -> matrix -> (key, t)
    alphas: dict[str, float] = {}
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise AdapterError(f"{path}: {key}: non-finite values")
        if key.endswith(".alpha"):
            alphas[key[: -len(".alpha")]] = float(value)
            continue
        suffix = next((s for s in PARTS if key.endswith(s)), None)
        if suffix is None:
            raise AdapterError(
                f"{path}: {key}: not a LoRA key (lora_A/lora_B, lora_down/lora_up, XLabs' "
                "down/up or alpha)"
            )
        layout, matrix = PARTS[suffix]
        layouts.add(layout)
        pairs.setdefault(key[: -len(suffix)], {})[matrix] = (key, value)
    if len(layouts) > 1:
        raise AdapterError(f"{path}: mixes layouts ({', '.join(sorted(layouts))})")
    keys = [key for parts in pairs.values() for key, _ in parts.values()]
    layout = _layout(path, layouts.pop(), keys, config)

    layers: dict[str, LayerLoRA] = {}
    for stem, parts in pairs.items():
        first_key = min(k for k, _ in parts.values())
        if set(parts) != {"A", "B"}:
            missing = ({"A", "B"} - set(parts)).pop()
            raise AdapterError(f"{path}: {first_key}: its {missing} matrix is missing")
        parts = {matrix: (key, t.float()) for matrix, (key, t) in parts.items()}
        down, up = parts["A"][1], parts["B"][1]
        if down.dim() != up.dim() or down.dim() not in (2, 4):
            raise AdapterError(
                f"{path}: {first_key}: A and B must both be 2-D (Linear) or 4-D (Conv2d), "
                f"got {tuple(down.shape)} and {tuple(up.shape)}"
            )
        if up.shape[1] != down.shape[0]:
            raise AdapterError(
                f"{path}: {first_key}: rank mismatch between A and B: A has {down.shape[0]} "
                f"rows, B has {up.shape[1]} columns"
            )
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise AdapterError(f"{path}: {first_key}: B of a Conv2d LoRA must be 1×1")
        if "rank" in metadata and int(metadata["rank"]) != down.shape[0]:
            raise AdapterError(
                f"{path}: {first_key}: rank {down.shape[0]}, the metadata says {metadata['rank']}"
            )
        rank = down.shape[0]
        alpha = alphas.pop(stem, file_alpha if file_alpha is not None else float(rank))
        for target, (a, b) in _targets(path, first_key, layout, stem, parts, config).items():
            if target in layers:
                raise AdapterError(f"{path}: {first_key}: a second pair for layer {target}")
            # a split that shares out the ranks (A chunked) keeps the pair's scale alpha / rank
            part_alpha = alpha if a.shape[0] == rank else alpha * a.shape[0] / rank
            layers[target] = LayerLoRA(stem, a.contiguous(), b.contiguous(), part_alpha)
    if alphas:
        stray = sorted(alphas)[0]
        raise AdapterError(f"{path}: {stray}.alpha: an alpha for a layer with no A/B pair")
    layers = dict(sorted(layers.items(), key=lambda kv: kv[1].key))  # the file's key order
    return Adapter(name or Path(path).stem, path, digest, layout, layers)


@dataclass(frozen=True)
class _Geometry:
    """What a LoRA branch needs of the layer it sits beside."""

    kind: str  # "linear" or "conv"
    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()

    def down_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, self.in_features, *self.kernel)

    def up_shape(self, rank: int) -> tuple[int, ...]:
        return (self.out_features, rank) + ((1, 1) if self.kind == "conv" else ())


def _geometry(module: nn.Module) -> _Geometry | None:
    """A Linear's or Conv2d's shape, for float layers and the quantized layers of every
    backend, read from the attributes they share: ``in_features`` / ``out_features`` (Linear,
    quanto's QLinear and torchao's Linear with a quantized weight tensor, x86's Int8Linear /
    Bf16Linear), ``in_channels`` / ``out_channels`` / ``stride`` / ``padding`` /
    ``dilation`` / ``groups`` (Conv2d, QConv2d, x86's Int8Conv2d / Bf16Conv2d; the x86 layers
    have no ``kernel_size``: the kernel is their weight's last two dims)."""
    if isinstance(module, LoRALayer):
        return module.geometry
    attrs: dict[str, Any] = {
        a: getattr(module, a)
        for a in ("in_features", "out_features", "in_channels", "out_channels", "stride",
                  "padding", "dilation", "groups", "padding_mode", "kernel_size")
        if hasattr(module, a)
    }  # fmt: skip
    if "in_features" in attrs and "out_features" in attrs:
        return _Geometry("linear", int(attrs["in_features"]), int(attrs["out_features"]))
    if not {"in_channels", "out_channels", "stride", "padding"} <= set(attrs):
        return None
    kernel = attrs.get("kernel_size")
    if kernel is None:
        weight = getattr(module, "weight_int8", None)
        weight = weight if weight is not None else getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            return None
        kernel = tuple(weight.shape[2:])
    if attrs.get("groups", 1) != 1 or attrs.get("padding_mode", "zeros") != "zeros":
        return None
    padding = attrs["padding"]
    return _Geometry(
        "conv",
        int(attrs["in_channels"]),
        int(attrs["out_channels"]),
        tuple(int(k) for k in kernel),
        tuple(int(s) for s in attrs["stride"]),
        padding if isinstance(padding, str) else tuple(int(p) for p in padding),
        tuple(int(d) for d in attrs.get("dilation", (1, 1))),
    )


def targets(denoiser: nn.Module) -> list[str]:
    """The layers ``attach`` can wrap: every Linear and ungrouped Conv2d, float or quantized."""
    return [n for n, m in denoiser.named_modules() if n and _geometry(m) is not None]


def _layer(denoiser: nn.Module, name: str) -> nn.Module | None:
    try:
        return denoiser.get_submodule(name)
    except AttributeError:
        return None


def check(adapter: Adapter, denoiser: nn.Module) -> None:
    """Raise AdapterError, naming the file and its first offending key, unless every layer
    of ``adapter`` is a Linear or Conv2d of ``denoiser`` (float or quantized) with the
    shapes its A and B need."""
    for name, layer in adapter.layers.items():
        where = f"{adapter.path}: {layer.key}"
        module = _layer(denoiser, name)
        if module is None:
            raise AdapterError(f"{where}: unknown layer {name}: the denoiser has no such module")
        geometry = _geometry(module)
        if geometry is None:
            raise AdapterError(
                f"{where}: layer {name} is a {type(module).__name__}, not a Linear or an "
                "ungrouped Conv2d"
            )
        for matrix, got, want in (
            ("A", layer.down.shape, geometry.down_shape(layer.rank)),
            ("B", layer.up.shape, geometry.up_shape(layer.rank)),
        ):
            if tuple(got) != want:
                raise AdapterError(
                    f"{where}: shape mismatch on {name} ({geometry.kind}): {matrix} expected "
                    f"{want}, got {tuple(got)}"
                )


class LoRALayer(nn.Module):
    """``base(x) + B((A x) * scale)``: a layer and a LoRA branch of fixed rank beside it.

    ``base`` is called as it is (its hooks, e.g. SmoothQuant's input division, apply to its
    own input only); the branch sees the layer's input. The buffers are not persistent: the
    denoiser's saved state is the base's alone. Unused rank slots hold zeros.

    ``gated``: while no adapter is active on the layer (``idle``), the branch is skipped and
    the layer costs what its base costs. For eager denoisers only: under ``torch.compile``
    the flag would be guarded on, and the first adapter after a warm-up without one would
    compile the whole graph again.
    """

    lora_down: torch.Tensor
    lora_up: torch.Tensor
    lora_scale: torch.Tensor

    def __init__(
        self,
        base: nn.Module,
        geometry: _Geometry,
        max_rank: int,
        dtype: torch.dtype,
        gated: bool = False,
    ):
        super().__init__()
        self.base = base
        self.gated = gated
        self.idle = True  # no adapter's ranks in the buffers (set_adapters keeps it)
        self.geometry = geometry
        self.max_rank = max_rank
        self.register_buffer(
            "lora_down", torch.zeros(geometry.down_shape(max_rank), dtype=dtype), persistent=False
        )
        self.register_buffer(
            "lora_up", torch.zeros(geometry.up_shape(max_rank), dtype=dtype), persistent=False
        )
        self.register_buffer("lora_scale", torch.zeros(max_rank, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated and self.idle:
            return self.base(x)
        y = self.base(x)
        h = x.to(self.lora_down.dtype)
        g = self.geometry
        if g.kind == "linear":
            delta = F.linear(F.linear(h, self.lora_down) * self.lora_scale, self.lora_up)
        else:
            h = F.conv2d(h, self.lora_down, None, g.stride, g.padding, g.dilation)
            delta = F.conv2d(h * self.lora_scale.view(-1, 1, 1), self.lora_up)
        return y + delta.to(y.dtype)


def attach(
    denoiser: nn.Module,
    max_rank: int,
    targets: Iterable[str],
    dtype: torch.dtype = torch.float32,
    gated: bool = False,
) -> list[str]:
    """Wrap each of ``targets`` (module names) in a ``LoRALayer`` with room for ``max_rank``
    ranks, all zero (no adapter). Once, before ``torch.compile``; after any quantized state
    is loaded (the wrapped layers' state-dict keys gain ``.base``; ``detach`` undoes it).

    Args:
        max_rank: the most ranks one layer takes, summed over the adapters of a request.
        dtype: of the buffers and the branch's arithmetic (the denoiser's compute dtype).
        gated: skip the branch of a layer no active adapter names (``LoRALayer``): for a
            denoiser that runs eager, so that a request without adapters costs nothing more.
    Returns the names wrapped (already wrapped ones are refused, not wrapped twice).
    """
    if max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, not {max_rank}")
    names = sorted(set(targets))
    plan = []
    for name in names:
        module = _layer(denoiser, name)
        if module is None:
            raise ValueError(f"unknown layer {name}: the denoiser has no such module")
        if isinstance(module, LoRALayer):
            raise ValueError(f"{name} has a LoRA branch already")
        geometry = _geometry(module)
        if geometry is None:
            raise ValueError(f"{name} is a {type(module).__name__}, not a Linear or a Conv2d")
        plan.append((name, module, geometry))
    for name, module, geometry in plan:
        wrapped = LoRALayer(module, geometry, max_rank, dtype, gated)
        device = next(
            (t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu")
        )
        _swap(denoiser, name, wrapped.to(device))
    return names


def _swap(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _lora_layers(denoiser: nn.Module) -> dict[str, LoRALayer]:
    return {n: m for n, m in denoiser.named_modules() if isinstance(m, LoRALayer)}


def detach(denoiser: nn.Module) -> None:
    """Put every wrapped layer's base back in its place."""
    for name, layer in _lora_layers(denoiser).items():
        _swap(denoiser, name, layer.base)


@torch.no_grad()
def set_adapters(denoiser: nn.Module, adapters: Sequence[tuple[Adapter, float]]) -> None:
    """Make ``adapters`` (each with its scale) the active set of an ``attach``ed denoiser;
    ``[]`` for none.

    Adapters are stacked along the rank dimension in the order given: on each layer the
    first takes rank slots ``[0, r1)``, the next ``[r1, r1 + r2)``, and each slot's scale is
    ``scale · alpha / rank`` of its adapter, so the branch computes exactly the sum of the
    adapters' deltas. Every adapter is checked (its layers wrapped, shapes matching, ranks
    within ``max_rank``) before any buffer is written: a refused set leaves the last one.
    The buffers are written in place (no new tensors), so a compiled denoiser does not
    recompile.
    """
    layers = _lora_layers(denoiser)
    if not layers:
        raise ValueError("the denoiser has no LoRA branches: call attach() first")
    used = dict.fromkeys(layers, 0)
    for adapter, _ in adapters:
        for name, layer in adapter.layers.items():
            if name not in layers:
                raise AdapterError(
                    f"{adapter.path}: {layer.key}: layer {name} has no LoRA branch "
                    "(not among the targets attached)"
                )
        check(adapter, denoiser)
        for name, layer in adapter.layers.items():
            used[name] += layer.rank
            if used[name] > layers[name].max_rank:
                raise AdapterError(
                    f"{adapter.path}: {layer.key}: ranks on {name} add up to {used[name]}, "
                    f"more than max_rank {layers[name].max_rank}"
                )
    for module in layers.values():
        module.lora_down.zero_()
        module.lora_up.zero_()
        module.lora_scale.zero_()
    start = dict.fromkeys(layers, 0)
    for adapter, scale in adapters:
        for name, layer in adapter.layers.items():
            module, r, i = layers[name], layer.rank, start[name]
            module.lora_down[i : i + r].copy_(layer.down)
            module.lora_up[:, i : i + r].copy_(layer.up)
            module.lora_scale[i : i + r].fill_(scale * layer.scale)
            start[name] = i + r
    for name, module in layers.items():
        module.idle = start[name] == 0
