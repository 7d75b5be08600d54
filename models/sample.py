"""Sample the embedded models: an image grid per model and its quality numbers.

    python -m models.sample                 # both models, 100 images each, into docs/
    python -m models.sample dit-digits --n 20

Per model it writes ``samples-<model>.png`` (a row per digit) and ``quality-<model>.json``:
prompt accuracy (digit, and both colors for text prompts) and the Fréchet distance of the
classifier features against held-out real images, next to the distance between two halves
of the held-out set, which is the floor a perfect model would reach.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from models import EMBEDDED as MODELS
from models import data
from models.targets import evaluation_targets, generate
from pipelines.loader import load_pipeline, read_defaults

MODELS_DIR = Path(__file__).resolve().parent
GRID_COLUMNS = 8
SCALE = 3


def grid_image(images: np.ndarray, rows: int, row_labels: list[str]) -> Image.Image:
    """Tile images (rows * columns, H, W, 3) into one picture, a label left of each row."""
    cols = len(images) // rows
    h, w = images.shape[1] * SCALE, images.shape[2] * SCALE
    pad, label_w = 2, 28
    grid = Image.new("RGB", (label_w + cols * (w + pad), rows * (h + pad)), (128, 128, 128))
    draw = ImageDraw.Draw(grid)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
        grid.paste(tile, (label_w + c * (w + pad), r * (h + pad)))
    for r, label in enumerate(row_labels):
        draw.text((4, r * (h + pad) + h // 2 - 5), label, fill=(255, 255, 255))
    return grid


def grid_targets(with_colors: bool) -> list[data.Target]:
    """A row per digit; for text models each column is one color pair, the same down the column."""
    fg, bg = data.draw_colors(np.random.default_rng(123), GRID_COLUMNS)
    return [
        data.Target(d, data.COLOR_NAMES[fg[c]], data.COLOR_NAMES[bg[c]])
        if with_colors
        else data.Target(d)
        for d in range(10)
        for c in range(GRID_COLUMNS)
    ]


def sample_model(name: str, n: int, seed: int, out: Path) -> dict:
    from models.evaluator import Evaluator

    folder = MODELS_DIR / name
    defaults = read_defaults(folder)
    settings = {k: defaults[k] for k in ("num_inference_steps", "guidance_scale")}
    with_colors = defaults.get("kind") == "text-to-image"
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)

    grid = generate(pipe, grid_targets(with_colors), seed=seed, **settings)
    grid_image(grid, 10, [str(d) for d in range(10)]).save(out / f"samples-{name}.png")

    targets = evaluation_targets(n, with_colors=with_colors, seed=seed)
    start = time.perf_counter()
    images = generate(pipe, targets, seed=seed, **settings)
    seconds = time.perf_counter() - start
    evaluator = Evaluator.load()
    heldout = data.load("heldout").images
    accuracy = evaluator.prompt_accuracy(images, targets)
    report = {
        "model": name,
        "images": n,
        "seed": seed,
        **settings,
        "prompt_accuracy": accuracy.prompt_accuracy,
        "digit_accuracy": accuracy.digit_accuracy,
        "color_accuracy": accuracy.color_accuracy,
        "fd": evaluator.fd(images, heldout),
        "fd_real_halves": evaluator.fd(heldout[::2], heldout[1::2]),
        "generation_seconds": round(seconds, 2),
    }
    (out / f"quality-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.sample", description=__doc__)
    parser.add_argument(
        "models", nargs="*", metavar="MODEL", help=f"any of {', '.join(MODELS)} (default: all)"
    )
    parser.add_argument("--n", type=int, default=100, help="images to evaluate per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=MODELS_DIR.parent / "docs")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models or MODELS:
        r = sample_model(name, args.n, args.seed, args.out)
        colors = "" if r["color_accuracy"] is None else f" colors {r['color_accuracy']:.2%}"
        print(
            f"{name}: prompt_accuracy {r['prompt_accuracy']:.2%} (digit {r['digit_accuracy']:.2%}"
            f"{colors}) fd {r['fd']:.2f} (real halves {r['fd_real_halves']:.2f}) "
            f"{r['images']} images in {r['generation_seconds']}s -> {args.out}"
        )


if __name__ == "__main__":
    main()
