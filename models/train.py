"""The recipe that trains the embedded models from scratch, seeded, on CPU.

    python -m models.train digit-classifier   # classifier of the quality evaluator (seconds)
    python -m models.train vae-digits   # shared AutoencoderKL 32x32x3 <-> 8x8x4 (minutes)
    python -m models.train dit-digits   # class-conditional DiT, needs the VAE
    python -m models.train t2i-digits   # text-to-image latent diffusion, needs the VAE
    python -m models.train all          # the four, in that order
    python -m models.train lora-italic-dit   # LoRA adapter: italic digits on dit-digits
    python -m models.train lora-italic-t2i   # the same on t2i-digits (``all`` trains neither)

Each writes a standard diffusers folder under models/ (safetensors only) and a ``recipe.json``
with its settings, seed, step count, final loss and wall time.

The ``lora-italic-*`` recipes build on a trained model, frozen: low-rank pairs (rank 8, alpha
8) beside the attention projections and feed-forward linears of its transformer blocks learn,
with the base's own noise objective, the latents of training digits sheared to lean right
(``data.shear_masks``; the same recolorings, captions and class labels). Each writes
``models/adapters/<model>-italic.safetensors`` (diffusers/PEFT keys ``transformer.`` or
``unet.<module>.lora_A.weight`` / ``lora_B.weight``, alpha and rank in the metadata) and a
``<model>-italic.json`` record: the recipe, the file's sha256, that ``pipelines.lora``
applied to the base reproduces the trained model, and the measured effect (mean slant,
``models.slant``, and digit accuracy of 64 images without and with the adapter).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
)

from models import architectures, data
from models.classifier import DigitClassifier, save_classifier
from models.data import digit_id2label
from models.tokenizer import MAX_LENGTH, build_tokenizer
from pipelines.loader import DEFAULTS_FILE, load_pipeline, read_defaults, save_pipeline

MODELS_DIR = Path(__file__).resolve().parent
RECIPE_FILE = "recipe.json"


@dataclass(frozen=True)
class Recipe:
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    warmup: int = 100
    ema_decay: float = 0.999


RECIPES = {
    "digit-classifier": Recipe(steps=1500, batch_size=64, lr=2e-3),
    "vae-digits": Recipe(steps=1500, batch_size=64, lr=1e-3),
    "dit-digits": Recipe(steps=7500, batch_size=128, lr=5e-4),
    "t2i-digits": Recipe(steps=7000, batch_size=64, lr=5e-4),
}
# Inference settings written into each pipeline folder (defaults.json).
SAMPLING = {
    "dit-digits": {"num_inference_steps": 20, "guidance_scale": 5.0},
    "t2i-digits": {"num_inference_steps": 20, "guidance_scale": 4.5},
}
COLORINGS = 10  # recolorings of each training digit whose latents are precomputed
KL_WEIGHT = 1e-5
CAPTION_DROP = 0.1  # share of empty prompts, for classifier-free guidance


class Progress:
    """Prints loss and elapsed time every ``every`` steps; remembers the last loss."""

    def __init__(self, name: str, steps: int, every: int = 100) -> None:
        self.name, self.steps, self.every = name, steps, every
        self.start = time.perf_counter()
        self.loss = float("nan")
        self._running: list[float] = []

    def step(self, i: int, loss: float) -> None:
        self._running.append(loss)
        if (i + 1) % self.every == 0 or i + 1 == self.steps:
            self.loss = float(np.mean(self._running))
            self._running.clear()
            print(
                f"[{self.name}] step {i + 1}/{self.steps} loss {self.loss:.4f} {self.elapsed:.0f}s",
                flush=True,
            )

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _schedule(opt: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 10% of the peak rate."""

    def factor(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.1 + 0.45 * (1 + np.cos(np.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _optimize(loss: torch.Tensor, opt, sched, clip=None) -> None:
    """One optimizer step on ``loss``: its gradients (their norm clipped to 1 over the
    parameters ``clip`` when given), the step, the learning rate's schedule."""
    opt.zero_grad()
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    sched.step()


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """Exponential moving average of the weights, with a short warm-up of the decay."""
    decay = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


def _display_path(path: Path) -> str:
    """A path relative to the project when it lies inside it (records stay machine-independent)."""
    try:
        return str(Path(path).resolve().relative_to(MODELS_DIR.parent))
    except ValueError:
        return str(path)


def _write_recipe(out: Path, name: str, recipe: Recipe, progress: Progress, **extra) -> None:
    record = {
        "model": name,
        "command": f"python -m models.train {name}",
        **asdict(recipe),
        "final_loss": round(progress.loss, 5),
        "wall_seconds": round(progress.elapsed, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        **extra,
    }
    (out / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the diffusers image convention."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _recolored(rng: np.random.Generator, masks: np.ndarray, idx: np.ndarray):
    fg, bg = data.draw_colors(rng, len(idx))
    return data.colorize(masks[idx], fg, bg), fg, bg


def train_classifier(recipe: Recipe, out: Path) -> None:
    """CNN on real digit masks, with small random shifts so it tolerates generated strokes."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    train, heldout = data.load("train"), data.load("heldout")
    masks, labels = torch.from_numpy(train.masks), torch.from_numpy(train.digits).long()
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = _schedule(opt, recipe)
    progress = Progress("classifier", recipe.steps, every=250)
    for i in range(recipe.steps):
        idx = torch.from_numpy(rng.integers(0, len(masks), recipe.batch_size))
        x = masks[idx]
        dx, dy = rng.integers(-2, 3, 2)
        x = torch.roll(x, shifts=(int(dy), int(dx)), dims=(1, 2))
        x = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
        logits, _ = model(x)
        loss = F.cross_entropy(logits, labels[idx])
        _optimize(loss, opt, sched)
        progress.step(i, loss.item())
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(heldout.masks))[0].argmax(1).numpy()
    accuracy = float((pred == heldout.digits).mean())
    print(f"[classifier] held-out accuracy {accuracy:.4f}")
    save_classifier(model, out)
    _write_recipe(out, "digit-classifier", recipe, progress, heldout_accuracy=round(accuracy, 4))


def train_vae(recipe: Recipe, out: Path) -> None:
    """AutoencoderKL on randomly recolored digits: MSE + a small KL term."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    train, heldout = data.load("train"), data.load("heldout")
    model = architectures.vae()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = _schedule(opt, recipe)
    progress = Progress("vae", recipe.steps)
    for i in range(recipe.steps):
        idx = rng.integers(0, len(train), recipe.batch_size)
        x = _images_to_tensor(_recolored(rng, train.masks, idx)[0])
        posterior = model.encode(x).latent_dist
        recon = model.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + KL_WEIGHT * posterior.kl().mean() / x[0].numel()
        _optimize(loss, opt, sched)
        progress.step(i, loss.item())
    model.eval()
    with torch.no_grad():
        x = _images_to_tensor(heldout.images)
        latents = model.encode(x).latent_dist.mode()
        recon = model.decode(latents).sample.clamp(-1, 1)
        mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2).item()
        scaling = 1.0 / latents.std().item()
    model.register_to_config(scaling_factor=scaling)
    psnr = 10 * np.log10(1.0 / mse)
    print(f"[vae] held-out reconstruction PSNR {psnr:.2f} dB, scaling_factor {scaling:.4f}")
    model.save_pretrained(out, safe_serialization=True)
    _write_recipe(out, "vae-digits", recipe, progress, heldout_psnr_db=round(psnr, 2))


def _load_vae(path: Path) -> AutoencoderKL:
    if not (path / "config.json").is_file():
        raise SystemExit(f"no VAE at {path}: run `python -m models.train vae-digits` first")
    return AutoencoderKL.from_pretrained(path, local_files_only=True).eval()


@torch.no_grad()
def _precompute_latents(
    vae: AutoencoderKL, seed: int, shear: float = 0.0, colorings: int = COLORINGS
):
    """Latents (scaled) of ``colorings`` random recolorings of every training digit, its mask
    sheared by ``shear`` first (``data.shear_masks``; 0: as it is)."""
    rng = np.random.default_rng(seed + 1)
    train = data.load("train")
    masks = data.shear_masks(train.masks, shear) if shear else train.masks
    idx = np.tile(np.arange(len(train)), colorings)
    images, fg, bg = _recolored(rng, masks, idx)
    latents = torch.cat(
        [
            vae.encode(_images_to_tensor(images[i : i + 512])).latent_dist.mode()
            for i in range(0, len(idx), 512)
        ]
    )
    return latents * vae.config.scaling_factor, train.digits[idx], fg, bg


def _train_scheduler(name: str) -> DDPMScheduler:
    """The noise schedule a model is trained with (its sampler is built from it)."""
    if name == "dit-digits":
        return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", steps_offset=1)
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
    )


def _noise_step(scheduler: DDPMScheduler, latents: torch.Tensor, gen: torch.Generator):
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
    return scheduler.add_noise(latents, noise, t), noise, t


def _sampler(train_scheduler: DDPMScheduler) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler.from_config(train_scheduler.config)


def _write_defaults(out: Path, name: str, **extra) -> None:
    defaults = {"model": name, "height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE}
    defaults.update(SAMPLING[name], **extra)
    (out / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")


def train_dit(recipe: Recipe, out: Path, vae_path: Path) -> None:
    """Class-conditional DiT on VAE latents; labels dropped 10% of the time (built into DiT)."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    vae = _load_vae(vae_path)
    progress = Progress("dit-digits", recipe.steps)
    latents, digits, _, _ = _precompute_latents(vae, recipe.seed)
    labels = torch.from_numpy(digits).long()
    scheduler = _train_scheduler("dit-digits")
    model = architectures.dit().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = _schedule(opt, recipe)
    for i in range(recipe.steps):
        idx = torch.randint(0, len(latents), (recipe.batch_size,), generator=gen)
        noisy, noise, t = _noise_step(scheduler, latents[idx], gen)
        pred = model(noisy, timestep=t, class_labels=labels[idx]).sample
        loss = F.mse_loss(pred, noise)
        _optimize(loss, opt, sched, clip=model.parameters())
        _ema_update(ema, model, recipe.ema_decay, i)
        progress.step(i, loss.item())
    id2label = {int(k): v for k, v in digit_id2label().items()}
    pipe = DiTPipeline(transformer=ema, vae=vae, scheduler=_sampler(scheduler), id2label=id2label)
    _save(pipe, out)
    _write_defaults(out, "dit-digits", kind="class-conditional")
    _write_recipe(out, "dit-digits", recipe, progress, vae=_display_path(vae_path))


def train_t2i(recipe: Recipe, out: Path, vae_path: Path) -> None:
    """UNet2DConditionModel and a small CLIP text encoder trained jointly on captions."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    vae = _load_vae(vae_path)
    progress = Progress("t2i-digits", recipe.steps)
    tokenizer = build_tokenizer(out / "_vocab")
    latents, digits, fg, bg = _precompute_latents(vae, recipe.seed)
    text_encoder = architectures.text_encoder(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    ).train()
    unet = architectures.unet().train()
    scheduler = _train_scheduler("t2i-digits")
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    sched = _schedule(opt, recipe)
    for i in range(recipe.steps):
        idx = torch.randint(0, len(latents), (recipe.batch_size,), generator=gen)
        ids = _caption_ids(tokenizer, rng, idx.tolist(), digits, fg, bg)
        noisy, noise, t = _noise_step(scheduler, latents[idx], gen)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        _optimize(loss, opt, sched, clip=params)
        _ema_update(ema_unet, unet, recipe.ema_decay, i)
        _ema_update(ema_text, text_encoder, recipe.ema_decay, i)
        progress.step(i, loss.item())
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=ema_text,
        tokenizer=tokenizer,
        unet=ema_unet,
        scheduler=_sampler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save(pipe, out)
    shutil.rmtree(out / "_vocab")
    _write_defaults(out, "t2i-digits", kind="text-to-image")
    _write_recipe(out, "t2i-digits", recipe, progress, vae=_display_path(vae_path))


def _caption_ids(tokenizer, rng: np.random.Generator, idx: list[int], digits, fg, bg):
    """Token ids of a caption for each training digit of ``idx`` (a random template), or of
    the empty prompt CAPTION_DROP of the time, for classifier-free guidance."""
    prompts = [
        ""
        if rng.random() < CAPTION_DROP
        else data.caption(
            int(digits[j]),
            data.COLOR_NAMES[fg[j]],
            data.COLOR_NAMES[bg[j]],
            int(rng.integers(len(data.TEMPLATES))),
        )
        for j in idx
    ]
    return tokenizer(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


def _save(pipe, out: Path) -> None:
    for sub in ("transformer", "unet", "text_encoder", "tokenizer", "vae", "scheduler"):
        shutil.rmtree(out / sub, ignore_errors=True)
    save_pipeline(pipe, out)


@dataclass(frozen=True)
class Italic:
    """A LoRA adapter teaching a trained model to draw its digits sheared by ``shear``."""

    base: str  # the model folder under models/ it builds on, frozen
    adapter: str  # file stem under models/adapters/
    shear: float
    rank: int = 8
    alpha: float = 8.0
    # the Linear layers that get a LoRA pair, by module-name suffix (``_lora_targets``): the
    # attention projections and feed-forward linears of the transformer blocks
    targets: tuple[str, ...] = (
        "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
    )  # fmt: skip
    eval_images: int = 64


# The DiT's shear is larger: sampled at its guidance 5.0 it shows less of the slant it learned.
# Exploratory runs of this recipe with other settings: trained on shear 0.4 for 3000 steps,
# its images leaned 0.18 more at guidance 5.0, 0.25 at 1.0 and 2.5; on shear 0.4, rank 16,
# lr 2e-3 for 2000 steps, or the adaLN or output linears added as targets gave 0.16 to 0.20
# at 5.0. Shear 0.5 takes its effect past 0.2 at some cost in digit accuracy (shear 0.6
# leaned 0.22, with 61 % of the digits read right).
LORA_RECIPES = {
    "lora-italic-dit": (
        Recipe(steps=1500, batch_size=64, lr=1e-3, warmup=50),
        Italic("dit-digits", "dit-digits-italic", shear=0.5),
    ),
    "lora-italic-t2i": (
        Recipe(steps=1500, batch_size=64, lr=1e-3, warmup=50),
        Italic("t2i-digits", "t2i-digits-italic", shear=0.4),
    ),
}
ADAPTERS_DIR = MODELS_DIR / "adapters"
PEFT_PREFIX = {"dit-digits": "transformer.", "t2i-digits": "unet."}


class TrainableLoRA(torch.nn.Module):
    """A frozen layer and a trainable low-rank pair beside it, computed as
    ``pipelines.lora.LoRALayer`` computes it: ``base(x) + B((A x) · alpha / rank)``.
    A (rank × in, or rank × in × kh × kw for a Conv2d) starts as PEFT starts it (Kaiming
    uniform), B (out × rank) at zero, so training starts from the base model exactly."""

    def __init__(self, base: torch.nn.Module, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.conv = isinstance(base, torch.nn.Conv2d)
        if self.conv:
            down = (rank, base.in_channels, *base.kernel_size)
            up: tuple[int, ...] = (base.out_channels, rank, 1, 1)
        elif isinstance(base, torch.nn.Linear):
            down, up = (rank, base.in_features), (base.out_features, rank)
        else:
            raise TypeError(f"a LoRA pair goes beside a Linear or a Conv2d, not {type(base)}")
        self.lora_A = torch.nn.Parameter(torch.empty(down))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=5**0.5, generator=gen)
        self.lora_B = torch.nn.Parameter(torch.zeros(up))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.conv:
            b = self.base
            h = F.conv2d(x, self.lora_A, None, b.stride, b.padding, b.dilation)
            return y + F.conv2d(h * self.scale, self.lora_B)
        return y + F.linear(F.linear(x, self.lora_A) * self.scale, self.lora_B)


def _denoiser(pipe) -> torch.nn.Module:
    return getattr(pipe, "transformer", None) or pipe.unet


def _lora_targets(denoiser: torch.nn.Module, italic: Italic) -> list[str]:
    """The Linear layers of the denoiser named by ``italic.targets``: module-name suffixes
    (``to_q`` matches every ``….to_q``) or whole names (``proj_out_2``)."""
    return [
        name
        for name, module in denoiser.named_modules()
        if isinstance(module, torch.nn.Linear)
        and any(name == t or name.endswith(f".{t}") for t in italic.targets)
    ]


def _wrap(denoiser: torch.nn.Module, names: list[str], italic: Italic, seed: int) -> dict:
    """Freeze the denoiser and put a ``TrainableLoRA`` in place of each named layer."""
    denoiser.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = denoiser.get_submodule(parent) if parent else denoiser
        wrapped[name] = TrainableLoRA(getattr(owner, child), italic.rank, italic.alpha, gen)
        setattr(owner, child, wrapped[name])
    return wrapped


def _save_adapter(path: Path, wrapped: dict, italic: Italic, recipe_name: str) -> None:
    """The pairs as a diffusers/PEFT safetensors file, byte for byte the same for the same
    tensors: safetensors writes its header's keys in no fixed order, so the header is
    written again with its keys sorted (the registry pins the file's sha256)."""
    import struct

    from safetensors.torch import save

    prefix = PEFT_PREFIX[italic.base]
    tensors = {}
    for name, layer in wrapped.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous()
    metadata = {
        "format": "pt",
        "alpha": str(italic.alpha),
        "rank": str(italic.rank),
        "base_model": italic.base,
        "style": f"italic: digits sheared by {italic.shear} (models.data.shear_masks)",
        "recipe": f"python -m models.train {recipe_name}",
    }
    data = save(tensors, metadata=metadata)
    (size,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":"))
    header += " " * (-len(header) % 8)  # the tensors stay 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + data[8 + size :])


def _probe_inputs(pipe, denoiser: torch.nn.Module, seed: int) -> dict:
    """A fixed batch of denoiser inputs: noisy latents at eight noise levels and the
    conditions of eight targets (the last one unconditional: DiT's null class, the empty
    prompt), for comparing two denoisers call for call."""
    from models.targets import denoiser_inputs, evaluation_targets
    from pipelines.generate import is_class_conditional

    gen = torch.Generator().manual_seed(seed)
    cfg = denoiser.config
    latents = torch.randn(8, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    timesteps = torch.linspace(20, 980, 8).long()
    targets = evaluation_targets(7, with_colors=not is_class_conditional(pipe))
    return denoiser_inputs(pipe, targets, latents, timesteps)


@torch.no_grad()
def _effect(pipe, adapter, italic: Italic) -> dict:
    """Mean slant and digit accuracy of ``italic.eval_images`` images from the pipeline (its
    denoiser attached), without the adapter and with it at scale 1.0."""
    from models.evaluator import Evaluator
    from models.targets import evaluation_targets, generate
    from pipelines import lora

    defaults = read_defaults(MODELS_DIR / italic.base)
    settings = {k: defaults[k] for k in ("num_inference_steps", "guidance_scale")}
    targets = evaluation_targets(italic.eval_images, with_colors=italic.base == "t2i-digits")
    evaluator = Evaluator.load()
    out = {"images": italic.eval_images, "seed": 0, **settings}
    for label, active in (("without", []), ("with", [(adapter, 1.0)])):
        lora.set_adapters(_denoiser(pipe), active)
        images = generate(pipe, targets, seed=0, **settings)
        accuracy = evaluator.prompt_accuracy(images, targets)
        out[f"slant_{label}"] = round(float(evaluator.slant(images).mean()), 4)
        out[f"digit_accuracy_{label}"] = round(accuracy.digit_accuracy, 4)
        out[f"prompt_accuracy_{label}"] = round(accuracy.prompt_accuracy, 4)
    out["slant_shift"] = round(out["slant_with"] - out["slant_without"], 4)
    return out


def train_italic(recipe_name: str, recipe: Recipe, italic: Italic, out: Path) -> Path:
    """Train the italic adapter of ``italic.base``; write its safetensors file and record
    into ``out``; returns the file. Checks that ``pipelines.lora`` reads it, accepts it for
    the base's denoiser and, applied beside the base's layers, gives the trained model's
    outputs (within 1e-4), before measuring its effect."""
    from pipelines import lora

    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    base_dir = MODELS_DIR / italic.base
    pipe = load_pipeline(base_dir)
    pipe.set_progress_bar_config(disable=True)
    denoiser = _denoiser(pipe)
    names = _lora_targets(denoiser, italic)
    wrapped = _wrap(denoiser, names, italic, recipe.seed)
    params = [p for layer in wrapped.values() for p in (layer.lora_A, layer.lora_B)]
    print(
        f"[{recipe_name}] {len(names)} layers, {sum(p.numel() for p in params)} LoRA "
        f"parameters (rank {italic.rank}); shear {italic.shear}",
        flush=True,
    )
    progress = Progress(recipe_name, recipe.steps)
    # as many recolorings as the steps can draw on, up to the base's COLORINGS (a short run
    # encodes fewer)
    samples = recipe.steps * recipe.batch_size
    colorings = min(COLORINGS, -(-samples // len(data.load("train"))))
    latents, digits, fg, bg = _precompute_latents(pipe.vae, recipe.seed, italic.shear, colorings)
    scheduler = _train_scheduler(italic.base)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    sched = _schedule(opt, recipe)
    denoiser.train()  # DiT drops class labels in training mode (its null class, for guidance)
    labels = torch.from_numpy(digits).long()
    for i in range(recipe.steps):
        idx = torch.randint(0, len(latents), (recipe.batch_size,), generator=gen)
        noisy, noise, t = _noise_step(scheduler, latents[idx], gen)
        if italic.base == "dit-digits":
            pred = denoiser(noisy, timestep=t, class_labels=labels[idx]).sample
        else:
            ids = _caption_ids(pipe.tokenizer, rng, idx.tolist(), digits, fg, bg)
            with torch.no_grad():
                context = pipe.text_encoder(ids)[0]
            pred = denoiser(noisy, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred, noise)
        _optimize(loss, opt, sched, clip=params)
        progress.step(i, loss.item())
    train_seconds = progress.elapsed
    denoiser.eval()

    path = out / f"{italic.adapter}.safetensors"
    _save_adapter(path, wrapped, italic, recipe_name)
    adapter = lora.read(path)
    fresh = load_pipeline(base_dir)
    fresh.set_progress_bar_config(disable=True)
    lora.check(adapter, _denoiser(fresh))
    lora.attach(_denoiser(fresh), italic.rank, adapter.layers)
    lora.set_adapters(_denoiser(fresh), [(adapter, 1.0)])
    probe = _probe_inputs(fresh, _denoiser(fresh), recipe.seed)
    with torch.no_grad():
        trained_out = denoiser(**probe).sample
        applied_out = _denoiser(fresh)(**probe).sample
        lora.set_adapters(_denoiser(fresh), [])
        base_out = _denoiser(fresh)(**probe).sample
    difference = float((trained_out - applied_out).abs().max())
    change = float((trained_out - base_out).abs().max())
    print(
        f"[{recipe_name}] pipelines.lora vs the trained model: max |diff| {difference:.2e} "
        f"(the adapter moves the base's output by up to {change:.3g})"
    )
    if difference > 1e-4:
        raise RuntimeError(f"{path}: applied by pipelines.lora it differs by {difference:.2e}")
    start = time.perf_counter()
    effect = _effect(fresh, adapter, italic) if italic.eval_images else None
    evaluation_seconds = round(time.perf_counter() - start, 1)
    print(f"[{recipe_name}] effect: {json.dumps(effect)}", flush=True)
    record = {
        "adapter": italic.adapter,
        "command": f"python -m models.train {recipe_name}",
        "base": _display_path(base_dir),
        "file": _display_path(path),
        "sha256": adapter.sha256,
        "layout": "diffusers/PEFT",
        "rank": italic.rank,
        "alpha": italic.alpha,
        "targets": [f"*.{t}" for t in italic.targets],  # glob patterns of the layer names
        "layers": len(names),
        "shear": italic.shear,
        **asdict(recipe),
        "final_loss": round(progress.loss, 5),
        "wall_seconds": round(train_seconds, 1),
        "evaluation_seconds": evaluation_seconds,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "colorings": colorings,
        "applied_vs_trained_max_abs_diff": difference,
        "trained_vs_base_max_abs_diff": round(change, 5),
        "effect": effect,
    }
    del record["ema_decay"]  # no moving average: the adapter is the last step's pairs
    (out / f"{italic.adapter}.json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def _shortened(recipe: Recipe, steps: int) -> Recipe:
    return Recipe(**{**asdict(recipe), "steps": steps, "warmup": min(recipe.warmup, steps)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m models.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model", choices=[*RECIPES, "all", *LORA_RECIPES])
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: models/<model>; models/adapters for a lora-* recipe)",
    )
    parser.add_argument("--steps", type=int, help="override the step count (e.g. a smoke test)")
    parser.add_argument(
        "--eval-images",
        type=int,
        help="lora-* recipes: images measuring the adapter's effect (default 64; 0: none)",
    )
    parser.add_argument(
        "--vae", type=Path, default=MODELS_DIR / "vae-digits", help="VAE folder to build on"
    )
    args = parser.parse_args(argv)
    if args.model in LORA_RECIPES:
        recipe, italic = LORA_RECIPES[args.model]
        if args.steps is not None:
            recipe = _shortened(recipe, args.steps)
        if args.eval_images is not None:
            italic = replace(italic, eval_images=args.eval_images)
        train_italic(args.model, recipe, italic, args.out or ADAPTERS_DIR)
        return
    names = list(RECIPES) if args.model == "all" else [args.model]
    if args.out and len(names) > 1:
        parser.error("--out needs a single model")
    for name in names:
        recipe = RECIPES[name]
        if args.steps is not None:
            recipe = _shortened(recipe, args.steps)
        out = args.out or MODELS_DIR / name
        out.mkdir(parents=True, exist_ok=True)
        if name == "digit-classifier":
            train_classifier(recipe, out)
        elif name == "vae-digits":
            train_vae(recipe, out)
        elif name == "dit-digits":
            train_dit(recipe, out, args.vae)
        else:
            train_t2i(recipe, out, args.vae)


if __name__ == "__main__":
    main()
