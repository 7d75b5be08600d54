"""What previews and edits cost at the real sizes: random-weight DiT-XL/2 (256 px) and
Stable Diffusion 1.5 (512 px) pipelines run through ``pipelines.generate.run``, the function
the workers call, so the same code paths run as for a real checkpoint.

    python -m bench.previews                       # both, CPU, fp32 (this machine)
    python -m bench.previews --models sd15 --device cuda --dtype fp16

Per model it times: a plain generation of ``--steps`` steps; the same with one preview (the
difference is the preview: one VAE decoding of the predicted clean latents); image-to-image
at strength 0.5 (half the steps run, plus one VAE encoding); for SD 1.5, inpainting half the
image at strength 1. Random weights say nothing of image quality; these are costs only.

SD 1.5's text encoder is CLIP ViT-L/14's text tower (12 layers, width 768, 77 positions); its
tokenizer here is t2i-digits' (no CLIP vocabulary ships offline), padded to 77 tokens, so the
text states have SD 1.5's shape. DiT-XL/2 and SD 1.5 share the VAE configuration
(sd-vae-ft-ema: 128/256/512/512 channels).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.full_size import dit_xl_2, sd15_unet, sd_vae
from bench.record import save
from pipelines import generate

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = Path(__file__).resolve().parents[1] / "models"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _vae(dtype, device):
    torch.manual_seed(0)
    return sd_vae(sample_size=512).to(device=device, dtype=dtype).eval()


def _scheduler(**betas):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, **betas)


def dit_pipeline(dtype, device):
    from diffusers import DiTPipeline

    pipe = DiTPipeline(
        transformer=dit_xl_2(dtype, device),
        vae=_vae(dtype, device),
        scheduler=_scheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        id2label={i: f"class {i}" for i in range(1000)},
    )
    return pipe, 207  # a class id


def sd15_pipeline(dtype, device):
    from diffusers import StableDiffusionPipeline
    from transformers import AutoTokenizer

    from bench.full_size import clip_l

    tokenizer = AutoTokenizer.from_pretrained(MODELS / "t2i-digits" / "tokenizer")
    tokenizer.model_max_length = 77
    torch.manual_seed(0)
    text = clip_l(tokenizer).to(device=device, dtype=dtype)
    pipe = StableDiffusionPipeline(
        vae=_vae(dtype, device),
        text_encoder=text.eval(),
        tokenizer=tokenizer,
        unet=sd15_unet(dtype, device),
        scheduler=_scheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe, "a red seven on a black background"


BUILDERS = {"dit-xl-2": (dit_pipeline, 256), "sd15": (sd15_pipeline, 512)}


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(name: str, dtype, device: str, steps: int) -> dict:
    build, size = BUILDERS[name]
    build_s, (pipe, condition) = _timed(lambda: build(dtype, device))
    pipe.set_progress_bar_config(disable=True)
    args = {"num_inference_steps": steps, "guidance_scale": 4.0}
    if name == "sd15":
        args.update(height=size, width=size)
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step(*_):
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    def run(**kw):
        step_times.clear()
        last[0] = time.perf_counter()
        return generate.run(pipe, [condition], [0], on_step=on_step, **args, **kw)

    run()  # warm-up: first-call allocations
    plain_s, plain = _timed(run)
    plain_steps = list(step_times)
    got = []
    preview_s, _ = _timed(
        lambda: run(preview_at=[steps // 2], on_preview=lambda k, s, px: got.append(px.shape))
    )
    image = plain.images[0]
    edit_s, edited = _timed(lambda: run(edit=generate.Edit(image, 0.5)))
    edit_steps = len(step_times)
    row = {
        "model": name,
        "image_px": size,
        "build_s": round(build_s, 2),
        "denoiser_parameters": sum(
            p.numel() for p in (getattr(pipe, "transformer", None) or pipe.unet).parameters()
        ),
        "steps": steps,
        "generate_s": round(plain_s, 3),
        "step_s_median": round(float(np.median(plain_steps)), 3),
        "generate_with_1_preview_s": round(preview_s, 3),
        "preview_cost_s": round(preview_s - plain_s, 3),
        "preview_shape": list(got[0]) if got else None,
        "image_to_image_strength_0.5_s": round(edit_s, 3),
        "image_to_image_steps_run": edit_steps,
        "image_to_image_shape": list(edited.images.shape),
    }
    if name == "sd15":
        mask = np.zeros(image.shape[:2], bool)
        mask[:, size // 2 :] = True
        inpaint_s, painted = _timed(lambda: run(edit=generate.Edit(image, 1.0, mask)))
        row["inpaint_strength_1_s"] = round(inpaint_s, 3)
        row["inpaint_shape"] = list(painted.images.shape)
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.previews",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows.append(measure(name, DTYPES[args.dtype], args.device, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    out = args.out or RESULTS / f"previews-full-size-{args.device.split(':')[0]}.json"
    save(
        out,
        "python -m bench.previews " + " ".join(argv if argv is not None else sys.argv[1:]),
        device=args.device,
        dtype=args.dtype,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        models=rows,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
