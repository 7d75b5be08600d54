"""The recipe that trains the embedded models from scratch, seeded, on CPU.

    python -m models.train digit-classifier   # classifier of the quality evaluator (seconds)
    python -m models.train vae-digits   # shared AutoencoderKL 32x32x3 <-> 8x8x4 (minutes)
    python -m models.train dit-digits   # class-conditional DiT, needs the VAE
    python -m models.train t2i-digits   # text-to-image latent diffusion, needs the VAE
    python -m models.train all          # the four, in that order

Each writes a standard diffusers folder under models/ (safetensors only) and a ``recipe.json``
with its settings, seed, step count, final loss and wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
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
from pipelines.loader import DEFAULTS_FILE, save_pipeline

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
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
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
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
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
def _precompute_latents(vae: AutoencoderKL, seed: int):
    """Latents (scaled) of COLORINGS random recolorings of every training digit."""
    rng = np.random.default_rng(seed + 1)
    train = data.load("train")
    idx = np.tile(np.arange(len(train)), COLORINGS)
    images, fg, bg = _recolored(rng, train.masks, idx)
    latents = torch.cat(
        [
            vae.encode(_images_to_tensor(images[i : i + 512])).latent_dist.mode()
            for i in range(0, len(idx), 512)
        ]
    )
    return latents * vae.config.scaling_factor, train.digits[idx], fg, bg


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
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", steps_offset=1)
    model = architectures.dit().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = _schedule(opt, recipe)
    for i in range(recipe.steps):
        idx = torch.randint(0, len(latents), (recipe.batch_size,), generator=gen)
        noisy, noise, t = _noise_step(scheduler, latents[idx], gen)
        pred = model(noisy, timestep=t, class_labels=labels[idx]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
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
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
    )
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    sched = _schedule(opt, recipe)
    for i in range(recipe.steps):
        idx = torch.randint(0, len(latents), (recipe.batch_size,), generator=gen)
        prompts = [
            ""
            if rng.random() < CAPTION_DROP
            else data.caption(
                int(digits[j]),
                data.COLOR_NAMES[fg[j]],
                data.COLOR_NAMES[bg[j]],
                int(rng.integers(len(data.TEMPLATES))),
            )
            for j in idx.tolist()
        ]
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=MAX_LENGTH,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        noisy, noise, t = _noise_step(scheduler, latents[idx], gen)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
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


def _save(pipe, out: Path) -> None:
    for sub in ("transformer", "unet", "text_encoder", "tokenizer", "vae", "scheduler"):
        shutil.rmtree(out / sub, ignore_errors=True)
    save_pipeline(pipe, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m models.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model", choices=[*RECIPES, "all"])
    parser.add_argument("--out", type=Path, help="output folder (default: models/<model>)")
    parser.add_argument("--steps", type=int, help="override the step count (e.g. a smoke test)")
    parser.add_argument(
        "--vae", type=Path, default=MODELS_DIR / "vae-digits", help="VAE folder to build on"
    )
    args = parser.parse_args(argv)
    names = list(RECIPES) if args.model == "all" else [args.model]
    if args.out and len(names) > 1:
        parser.error("--out needs a single model")
    for name in names:
        recipe = RECIPES[name]
        if args.steps is not None:
            recipe = Recipe(
                **{**asdict(recipe), "steps": args.steps, "warmup": min(recipe.warmup, args.steps)}
            )
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
