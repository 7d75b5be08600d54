"""FP against quantized, with the same seeds: fidelity, task quality, size, speed and memory.

Each variant (the FP source, then each artifact) samples in a fresh process, so its peak RSS is
its own and nothing cached by one variant helps another. The parent compares what they return:

- ``sqnr_latent_db``: final latents (what the VAE decodes) against FP, over the whole batch;
- ``psnr_db`` / ``ssim``: decoded images against FP's;
- ``prompt_accuracy`` / ``fd``: the digits evaluator (embedded models only; None otherwise);
  any other model is asked the ``--prompts`` / ``--classes`` it is given, cycled;
- ``denoiser_weight_bytes``, ``step_latency_ms`` (median denoiser call), ``peak_rss_bytes``.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["EvalSettings", "evaluate"]


@dataclass(frozen=True)
class EvalSettings:
    n: int = 64
    seed: int = 0
    num_inference_steps: int | None = None  # None: the model folder's / pipeline's default
    guidance_scale: float | None = None
    batch_size: int = 16
    prompts: str | None = None  # a prompts file, for a model that is not embedded
    classes: str | None = None  # "1,207,360" or "all"


def _conditions(pipe, source: str, s: EvalSettings, with_colors: bool) -> list:
    from models.targets import conditions_for, evaluation_targets
    from quantization.calibration import resolve_conditions

    given = resolve_conditions(pipe, source, s.prompts, s.classes)
    if given.values:
        return [given.values[i % len(given.values)] for i in range(s.n)]
    return conditions_for(pipe, evaluation_targets(s.n, with_colors=with_colors, seed=s.seed))


def _run_variant(
    source: str, path: str, quantized: bool, s: EvalSettings, with_colors: bool
) -> dict:
    """In a child process: load, sample n images, time every denoiser call."""
    import torch

    from pipelines.generate import sample
    from pipelines.loader import sampling_settings
    from quantization import backends
    from quantization.artifact import load_quantized, open_source, read_manifest
    from quantization.blocks import denoiser_attr

    start = time.perf_counter()
    pipe = load_quantized(path) if quantized else open_source(path)
    load_seconds = time.perf_counter() - start
    steps, guidance = sampling_settings(source, s.num_inference_steps, s.guidance_scale, pipe)
    denoiser = getattr(pipe, denoiser_attr(pipe))
    if quantized:
        weight_bytes = backends.get(read_manifest(Path(path))["backend"]).nbytes(denoiser)
    else:
        weight_bytes = backends.tensor_bytes(denoiser.state_dict())
    durations: list[float] = []
    began = [0.0]
    pre = denoiser.register_forward_pre_hook(lambda m, a: began.__setitem__(0, time.perf_counter()))
    post = denoiser.register_forward_hook(
        lambda m, a, o: durations.append(time.perf_counter() - began[0])
    )
    conditions = _conditions(pipe, source, s, with_colors)
    with torch.no_grad():  # quanto tensors do not support inference mode
        samples = sample(
            pipe,
            conditions,
            seed=s.seed,
            num_inference_steps=steps,
            guidance_scale=guidance,
            batch_size=s.batch_size,
        )
    pre.remove()
    post.remove()
    return {
        "images": samples.images,
        "latents": samples.latents.float().numpy(),
        "denoiser_weight_bytes": weight_bytes,
        "step_latency_ms": 1000 * statistics.median(durations),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_seconds": round(load_seconds, 3),
        "num_inference_steps": steps,
        "guidance_scale": guidance,
    }


def _in_fresh_process(*args) -> dict:
    with ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        return pool.submit(_run_variant, *args).result()


def evaluate(
    source: str, artifacts: list[str], settings: EvalSettings = EvalSettings(), progress=print
) -> dict:
    """The metrics of FP and of each artifact, as one JSON-able dict."""
    from models import data, embedded_model
    from models.targets import evaluation_targets
    from pipelines.loader import read_defaults
    from quality.metrics import psnr_db, sqnr_db, ssim

    digits = embedded_model(source) is not None
    if not digits and settings.prompts is None and settings.classes is None:
        raise ValueError(
            f"{source} is not an embedded model: pass --prompts FILE (text-to-image) or "
            "--classes 1,207,360 | all (class-conditional) to say what to ask it"
        )
    with_colors = digits and read_defaults(source).get("kind") == "text-to-image"
    evaluator = heldout = targets = None
    if digits:
        from models.evaluator import Evaluator

        evaluator = Evaluator.load()
        heldout = data.load("heldout").images
        targets = evaluation_targets(settings.n, with_colors=with_colors, seed=settings.seed)

    rows = []
    fp = None
    for label, path, quantized in [
        ("fp", source, False),
        *[(Path(a).name, a, True) for a in artifacts],
    ]:
        progress(f"sampling {settings.n} images with {label} ({path})")
        run = _in_fresh_process(str(source), str(path), quantized, settings, with_colors)
        fp = fp or run
        row = {
            "variant": label,
            "path": str(path),
            "sqnr_latent_db": _finite(sqnr_db(fp["latents"], run["latents"])),
            "psnr_db": _finite(psnr_db(fp["images"], run["images"])),
            "ssim": round(ssim(fp["images"], run["images"]), 4),
            "prompt_accuracy": None,
            "fd": None,
            **{k: run[k] for k in ("denoiser_weight_bytes", "peak_rss_bytes", "load_seconds")},
            "step_latency_ms": round(run["step_latency_ms"], 3),
        }
        if evaluator is not None and targets is not None and heldout is not None:
            row["prompt_accuracy"] = evaluator.prompt_accuracy(
                run["images"], targets
            ).prompt_accuracy
            row["fd"] = round(evaluator.fd(run["images"], heldout), 3)
        rows.append(row)
        progress(
            f"  {label}: sqnr_latent {row['sqnr_latent_db']} dB, psnr {row['psnr_db']} dB, "
            f"accuracy {row['prompt_accuracy']}, {row['denoiser_weight_bytes']} B, "
            f"{row['step_latency_ms']} ms/step"
        )
    assert fp is not None
    return {
        "source": str(source),
        "images": settings.n,
        "seed": settings.seed,
        "num_inference_steps": fp["num_inference_steps"],
        "guidance_scale": fp["guidance_scale"],
        "batch_size": settings.batch_size,
        "variants": rows,
    }


def _finite(x: float) -> float | None:
    return None if np.isinf(x) else round(float(x), 3)
