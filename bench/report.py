"""The side-by-side report: every embedded model x variant, what it costs and what it keeps.

    python -m bench.report [--runs 7]

For each model of the registry and each of its variants, in a fresh process: load time,
end-to-end and per-step latency (median and p95 over ``--runs`` runs after 2 warm-ups, one
image at the model's default steps), the per-step latency again with the denoiser compiled
(``torch.compile``, as a worker with ``compile = true`` runs it), peak RSS, denoiser and
whole-pipeline weight bytes, and
how latency grows with the number of steps and with the batch size n. Quality comes from
``quantization.evaluate`` (64 images, the same seeds as FP): prompt accuracy, fd, PSNR / SSIM /
SQNR of latents against FP. Image grids put FP next to each variant, same seeds. The embedded
models have one size (32x32), so there is no resolution sweep.
Writes bench/results/report.json, report.md and the PNGs it shows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np

from bench.record import save

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2  # torch threads of the timed runs
STEP_SWEEP = (5, 10, 20, 40)
BATCH_SWEEP = (1, 2, 4, 8)
GRID_COLORS = ("red", "blue", "green", "yellow", "white", "black")
QUALITY = ("prompt_accuracy", "fd", "psnr_db", "ssim", "sqnr_latent_db")


def _measure(model: str, variant: str, runs: int) -> dict:
    """In a child process: load the variant as a worker does and time it."""
    import torch

    from app.config import get_settings
    from app.queue.records import JobRequest
    from app.registry import load_registry
    from app.worker import pipeline
    from pipelines.loader import compile_denoiser

    torch.set_num_threads(THREADS)
    spec = load_registry(get_settings().registry).get(model)
    # eager first, whatever the registry says: the compiled step is timed below
    loaded = pipeline.load(spec, replace(spec.variants[variant], compile=False), "cpu")
    prompt = "seven" if spec.labels else "a red seven on a black background"

    def request(steps: int, n: int = 1, seed: int = 0) -> JobRequest:
        return JobRequest(
            model=model,
            variant=variant,
            prompt=prompt,
            n=n,
            width=32,
            height=32,
            steps=steps,
            guidance_scale=spec.guidance,
            seed=seed,
            class_id=spec.class_id(prompt),
        )

    def timed(req: JobRequest) -> tuple[float, list[float]]:
        marks = [time.perf_counter()]
        pipeline.run_batch(loaded, spec, [req], lambda *_: marks.append(time.perf_counter()))
        total = time.perf_counter() - marks[0]
        return 1000 * total, [1000 * (b - a) for a, b in pairwise(marks)]

    for _ in range(2):
        timed(request(spec.default_steps))
    pipeline.reset_peak_memory("cpu")
    totals, steps_ms = [], []
    for i in range(runs):
        total, per_step = timed(request(spec.default_steps, seed=i))
        totals.append(total)
        steps_ms += per_step
    _, peak = pipeline.peak_memory("cpu")
    by_steps = {s: statistics.median(timed(request(s))[0] for _ in range(3)) for s in STEP_SWEEP}
    by_n = {
        n: statistics.median(timed(request(spec.default_steps, n))[0] for _ in range(3))
        for n in BATCH_SWEEP
    }
    # the same variant with its denoiser compiled, as a worker with `compile = true` runs it
    compile_denoiser(loaded.pipe)
    for _ in range(2):  # the first call compiles
        timed(request(spec.default_steps))
    compiled_steps = []
    for i in range(runs):
        compiled_steps += timed(request(spec.default_steps, seed=i))[1]
    pipe = loaded.pipe
    pipeline_bytes = 0
    for name in ("vae", "text_encoder", "transformer", "unet"):
        component = getattr(pipe, name, None)
        if component is None:
            continue
        if name in ("transformer", "unet"):
            pipeline_bytes += loaded.denoiser_weight_bytes
        else:
            pipeline_bytes += sum(p.numel() * p.element_size() for p in component.parameters())
    return {
        "model": model,
        "variant": variant,
        "steps": spec.default_steps,
        "load_s": round(loaded.load_seconds, 3),
        "latency_ms_median": round(statistics.median(totals), 1),
        "latency_ms_p95": round(float(np.percentile(totals, 95)), 1),
        "step_ms_median": round(statistics.median(steps_ms), 2),
        "step_ms_p95": round(float(np.percentile(steps_ms, 95)), 2),
        "compiled_step_ms_median": round(statistics.median(compiled_steps), 2),
        "peak_rss_bytes": peak,
        "denoiser_weight_bytes": loaded.denoiser_weight_bytes,
        "pipeline_weight_bytes": pipeline_bytes,
        "latency_ms_by_steps": {str(k): round(v, 1) for k, v in by_steps.items()},
        "latency_ms_by_n": {str(k): round(v, 1) for k, v in by_n.items()},
    }


def _grid(model: str, variants: list[str]) -> np.ndarray:
    """In a child process: the ten digits (image i seeded with i), a row per variant."""
    from app.config import get_settings
    from app.registry import load_registry
    from app.worker import pipeline
    from models.data import Target
    from models.targets import conditions_for
    from pipelines.generate import sample

    spec = load_registry(get_settings().registry).get(model)
    targets = [  # a text-to-image model also gets a color pair per digit
        Target(d) if spec.labels else Target(d, GRID_COLORS[d % 6], GRID_COLORS[(d + 2) % 6])
        for d in range(10)
    ]
    rows = []
    for variant in variants:
        pipe = pipeline.load(spec, spec.variants[variant], "cpu").pipe
        samples = sample(
            pipe,
            conditions_for(pipe, targets),
            seed=0,
            num_inference_steps=spec.default_steps,
            guidance_scale=spec.guidance,
        )
        rows.append(samples.images)
    return np.stack(rows)


def _fresh(fn, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from app.config import get_settings
    from app.registry import load_registry
    from quantization.evaluate import evaluate

    registry = load_registry(get_settings().registry)
    rows, grids = [], {}
    for model, spec in registry.models.items():
        variants = list(spec.variants)
        quantized = [v for v in variants if spec.variants[v].quantized]
        reference = next(v for v in variants if not spec.variants[v].quantized)
        artifacts = [str(spec.variants[v].artifact) for v in quantized]
        evaluated = evaluate(spec.source, artifacts, progress=print)["variants"]
        quality = dict(zip([reference, *quantized], evaluated, strict=True))
        for variant in variants:
            print(f"timing {model}/{variant}")
            row = _fresh(_measure, model, variant, args.runs)
            q = quality.get(variant, {})
            row.update({k: q.get(k) for k in QUALITY})
            rows.append(row)
        grids[model] = (variants, _fresh(_grid, model, variants))
    record = save(
        args.out / "report.json",
        "python -m bench.report",
        torch_threads=THREADS,
        runs=args.runs,
        rows=rows,
    )
    _plots(rows, args.out)
    for model, (variants, images) in grids.items():
        _save_grid(images, variants, args.out / f"report-grid-{model}.png")
    (args.out / "report.md").write_text(_markdown(record, list(grids)))
    print(f"wrote {args.out / 'report.md'}")


def _plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for row in (r for r in rows if r["model"] == model):
            for j, key in enumerate(("latency_ms_by_steps", "latency_ms_by_n")):
                xs = [int(k) for k in row[key]]
                axes[i][j].plot(xs, list(row[key].values()), marker="o", label=row["variant"])
        axes[i][0].set(title=f"{model}: latency against steps (n = 1)", xlabel="steps", ylabel="ms")
        axes[i][1].set(title=f"{model}: latency against batch size n", xlabel="n", ylabel="ms")
        for ax in axes[i]:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "report-scaling.png", dpi=80)


def _save_grid(images: np.ndarray, variants: list[str], path: Path) -> None:
    from PIL import Image, ImageDraw

    rows, cols, h, w, _ = images.shape
    scale, label = 3, 90
    canvas = Image.new("RGB", (label + cols * w * scale, rows * h * scale), "white")
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        draw.text((4, r * h * scale + h * scale // 2 - 5), variants[r], fill="black")
        for c in range(cols):
            tile = Image.fromarray(images[r, c]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label + c * w * scale, r * h * scale))
    canvas.save(path)


def _full_size_section() -> list[str]:
    """Real-size shapes with random weights, from ``python -m bench.full_size`` results."""
    lines = [
        "## Real-size architectures (random weights)",
        "",
        "| shape | device, dtype | variant | backend | weight bytes | x fp16 | step ms "
        "| SQNR (random) dB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("full_size-*.json")):
        result = json.loads(path.read_text())
        shape = result["model"].split(" shape")[0]
        for v in result["variants"]:
            lines.append(
                f"| {shape} | {result['device']}, {result['dtype']} | {v['variant']} | "
                f"{_fmt(v.get('backend'))} | {_fmt(v.get('weight_bytes'), ',')} | "
                f"{_fmt(v.get('ratio_to_fp16'))} | "
                f"{v['step_latency_ms']} | "
                f"{_fmt(v.get('sqnr_random_db'))} |"
            )
    lines += [
        "",
        "From `python -m bench.full_size [--arch sd15-unet] [--device cuda --dtype bf16]`",
        "(`bench/results/full_size-*.json`); one denoiser call, batch 2.",
        "",
    ]
    return lines


def _fmt(value, spec: str = "") -> str:
    return "" if value is None else format(value, spec)


def _markdown(record: dict, models: list[str]) -> str:
    lines = [
        "# Side-by-side report",
        "",
        f"`{record['command']}` on {record['date']}, {record['machine']}, torch "
        f"{record['torch_threads']} threads. Latency: one image at",
        f"the model's default steps, median and p95 of {record['runs']} runs after 2 warm-ups;",
        "quality: 64 images against FP with the same seeds (`quantization.evaluate`).",
        "",
        "| model | variant | denoiser bytes | pipeline bytes | latency ms (p50 / p95) "
        "| step ms (p50 / p95) | compiled step ms (p50) | peak RSS MiB | load s "
        "| prompt accuracy | fd | PSNR dB | SSIM | SQNR latents dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['denoiser_weight_bytes']:,} | "
            f"{r['pipeline_weight_bytes']:,} | {r['latency_ms_median']} / {r['latency_ms_p95']} | "
            f"{r['step_ms_median']} / {r['step_ms_p95']} | {r['compiled_step_ms_median']} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} | "
            f"{r['load_s']} | {_fmt(r['prompt_accuracy'], '.3f')} | {_fmt(r['fd'], '.1f')} | "
            f"{_fmt(r['psnr_db'], '.2f')} | {_fmt(r['ssim'], '.3f')} | "
            f"{_fmt(r['sqnr_latent_db'], '.2f')} |"
        )
    lines += ["", "The embedded models have one size (32x32), so there is no resolution sweep.", ""]
    lines += _full_size_section()
    lines += [
        "",
        "How latency grows with steps and with the batch size n:",
        "",
        "![scaling](report-scaling.png)",
        "",
    ]
    for model in models:
        lines += [
            f"{model}, the ten digits with seeds 0-9, FP on the first row, each variant below:",
            "",
            f"![{model}](report-grid-{model}.png)",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
