"""What ``python -m quantization quantize`` costs at the real sizes, and how good the time
estimate it prints before measuring is: random-weight DiT-XL/2 (256 px) and Stable Diffusion
1.5 (512 px) pipelines saved as folders, then quantized by the CLI in a subprocess, exactly as
a user runs it.

    python -m bench.quantize_cost --model dit-xl-2 --recipe w8a8
    python -m bench.quantize_cost --model sd15 --recipe w4a8-sqnr --device cuda --dtype bf16
    python -m bench.quantize_cost --model dit-xl-2 --recipe w8a8 --layers 1 --steps 4 \
        --max-minutes 5                                   # a dry run

Per run: the wall clock of the quantize process (loading included); the manifest's estimate
of each stage against what it took and the denoiser / block calls it made; the artifact
reloaded in a fresh process; a re-plan from the saved analysis to the recipe's target + 3 dB
(``quantize --analysis``, which must not measure again). The pipeline folder is built once,
in fp32 on the CPU, and cached under ``--work``. Random weights say nothing of image quality;
these are costs only. SD 1.5's pipeline is bench.previews' (CLIP-L-sized text encoder, the
t2i-digits tokenizer padded to 77 tokens) and calibrates on ``PROMPTS``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench.record import save

__all__ = [
    "PROMPTS",
    "conditions_args",
    "estimate_errors",
    "markdown_table",
    "quantize_args",
    "replan_args",
    "stage_rows",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = Path("/tmp/t2i-quantize-cost")
MODELS = ("dit-xl-2", "sd15")
DTYPES = ("fp32", "bf16", "fp16")
REPLAN_DB = 3.0  # the default re-plan target: the recipe's own plus this
REPLAN_PHRASE = "no new sensitivity measurement"
# The estimate's name of a stage where the run times it under another one.
ACTUAL_NAME = {"check": "check images"}

PROMPTS = (
    "a photograph of a red fox in the snow",
    "an oil painting of a lighthouse at dusk",
    "a bowl of ramen on a wooden table",
    "a watercolor of a sailboat on a calm lake",
    "a close-up of a honeybee on a sunflower",
    "a city street at night in the rain",
    "a pencil sketch of an old man reading",
    "a bright red vintage car by the sea",
    "a mountain cabin under a starry sky",
    "a cat sleeping on a stack of books",
    "a plate of sushi seen from above",
    "a medieval castle on a green hill",
    "a robot watering plants in a greenhouse",
    "a stained glass window with blue birds",
    "a desert road with a single cactus",
    "a golden retriever running on the beach",
    "a cup of coffee with latte art",
    "a snowy pine forest at sunrise",
    "a portrait of a woman in a yellow hat",
    "an astronaut riding a horse on the moon",
    "a tropical fish in a coral reef",
    "a wooden bridge over a waterfall",
    "a bakery window full of bread",
    "a hot air balloon over a valley",
    "a black and white photo of a train station",
    "a field of tulips under a cloudy sky",
    "a dragon made of paper on a desk",
    "a bicycle leaning on a brick wall",
    "a bowl of fresh strawberries",
    "an owl perched on a mossy branch",
    "a futuristic city with flying cars",
    "a lantern glowing in a dark cave",
)


@dataclass(frozen=True)
class Run:
    """A finished subprocess: its wall clock, exit status and what it wrote to stderr."""

    seconds: float
    rc: int
    stderr: str

    def error(self) -> str | None:
        return None if self.rc == 0 else "\n".join(self.stderr.strip().splitlines()[-5:])


# -- the pipeline folder ---------------------------------------------------------------------


def work_dir(model: str, layers: int | None) -> Path:
    return WORK / (model if layers is None else f"{model}-L{layers}")


def build_pipeline(model: str, layers: int | None):
    """The random-weight pipeline, fp32 on the CPU (the folder is the same for every device
    and dtype: the quantize command loads it in its own ``--dtype``)."""
    if model == "sd15":
        return _sd15_pipeline(layers)
    import torch
    from diffusers import DiTPipeline

    from bench.full_size import dit_xl_2
    from bench.previews import _scheduler, _vae

    dtype, device = torch.float32, "cpu"
    return DiTPipeline(
        transformer=dit_xl_2(dtype, device, layers or 28),
        vae=_vae(dtype, device),
        scheduler=_scheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        id2label={i: f"class {i}" for i in range(1000)},
    )


def _sd15_pipeline(layers: int | None):
    """bench.previews.sd15_pipeline with ``layers`` per UNet block (its text encoder too)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import AutoTokenizer

    from bench.full_size import clip_l, sd15_unet
    from bench.previews import MODELS as EMBEDDED
    from bench.previews import _scheduler, _vae

    dtype, device = torch.float32, "cpu"
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED / "t2i-digits" / "tokenizer")
    tokenizer.model_max_length = 77
    torch.manual_seed(0)
    text = clip_l(tokenizer)
    return StableDiffusionPipeline(
        vae=_vae(dtype, device),
        text_encoder=text.eval(),
        tokenizer=tokenizer,
        unet=sd15_unet(dtype, device, layers or 2),
        scheduler=_scheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def prepare(model: str, layers: int | None, work: Path) -> tuple[Path, Path | None]:
    """The pipeline folder (built and saved unless a previous run left it) and, for SD 1.5,
    the prompts file next to it."""
    from pipelines.loader import save_pipeline

    folder = work / "pipeline"
    if not folder.is_dir():
        print(f"building the {model} pipeline into {folder}", file=sys.stderr, flush=True)
        partial = work / "pipeline.partial"  # renamed when complete: a killed build is redone
        shutil.rmtree(partial, ignore_errors=True)
        save_pipeline(build_pipeline(model, layers), partial)
        partial.rename(folder)
    if model != "sd15":
        return folder, None
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return folder, prompts


# -- the command lines -----------------------------------------------------------------------


def conditions_args(prompts: Path | None) -> list[str]:
    """What the pipeline calibrates and measures on: every class (DiT) or the prompts file."""
    return ["--classes", "all"] if prompts is None else ["--prompts", str(prompts)]


def _placement(device: str, dtype: str) -> list[str]:
    """``--device`` and ``--dtype`` only where they differ from the CLI's defaults, so a CPU fp32
    run is the README's command as written."""
    return (["--device", device] if device != "cpu" else []) + (
        ["--dtype", dtype] if dtype != "fp32" else []
    )


def quantize_args(
    folder: Path,
    recipe: str,
    out: Path,
    conditions: list[str],
    steps: int,
    *,
    max_minutes: float | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
) -> list[str]:
    """``python -m quantization quantize ...`` as a user runs it, less the interpreter."""
    args = ["-m", "quantization", "quantize", str(folder), *conditions, "--steps", str(steps)]
    args += ["--recipe", recipe, "--out", str(out)]
    if max_minutes is not None:
        args += ["--max-minutes", f"{max_minutes:g}"]
    return args + _placement(device, dtype)


def replan_args(
    folder: Path,
    analysis: Path,
    target_db: float,
    out: Path,
    conditions: list[str],
    steps: int,
    *,
    device: str = "cpu",
    dtype: str = "fp32",
) -> list[str]:
    """The re-plan from a saved analysis to another target SQNR, less the interpreter."""
    args = ["-m", "quantization", "quantize", str(folder), *conditions, "--steps", str(steps)]
    args += ["--analysis", str(analysis), "--target-sqnr", f"{target_db:g}", "--out", str(out)]
    return args + _placement(device, dtype)


def shown(args: list[str]) -> str:
    return shlex.join(["python", *args])


# -- running ---------------------------------------------------------------------------------


def run_logged(args: list[str], log: Path, stdout: Path) -> Run:
    """Run ``python args`` from the repository root, offline; stderr echoed and kept in ``log``,
    stdout in ``stdout``. Timed from start to exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    chunks = []
    start = time.perf_counter()
    with log.open("wb") as log_file, stdout.open("wb") as out_file:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdout=out_file, stderr=subprocess.PIPE
        )
        assert proc.stderr is not None
        while chunk := os.read(proc.stderr.fileno(), 4096):  # tqdm's bars end lines with \r
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            log_file.write(chunk)
            chunks.append(chunk)
        rc = proc.wait()
    return Run(time.perf_counter() - start, rc, b"".join(chunks).decode(errors="replace"))


def reload(out: Path) -> dict:
    """``load_quantized`` in a fresh process: whether it loads, and the seconds it took there."""
    code = (
        "from quantization import load_quantized; import time; t=time.perf_counter(); "
        f"p=load_quantized({str(out)!r}); print(time.perf_counter()-t)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"ok": False, "error": "\n".join(done.stderr.strip().splitlines()[-5:])}
    seconds = float(done.stdout.strip().splitlines()[-1])
    return {"ok": True, "seconds": round(seconds, 2), "process_seconds": round(wall, 2)}


# -- reading the manifest --------------------------------------------------------------------


def stage_rows(work: dict) -> list[dict]:
    """Per stage, the estimate (what it runs, seconds) beside the seconds it took and the calls
    it made, from a manifest's ``work``. Stages in the order they ran, then those estimated and
    never run; ``None`` where a side has no number (the probe is never estimated; ``calls`` is
    missing in older manifests)."""
    estimated = {
        ACTUAL_NAME.get(s["name"], s["name"]): s
        for s in (work.get("estimate") or {}).get("stages", [])
    }
    actual = work.get("actual") or {}
    calls = work.get("calls") or {}
    names = list(dict.fromkeys([*actual, *estimated, *calls]))
    rows = []
    for name in names:
        guess = estimated.get(name, {})
        took = actual.get(name)
        rows.append(
            {
                "stage": name,
                "work": guess.get("work"),
                "estimated_s": guess.get("seconds"),
                "actual_s": took,
                "error": relative_error(guess.get("seconds"), took),
                "denoiser_calls": calls.get(name, {}).get("denoiser"),
                "block_calls": calls.get(name, {}).get("blocks"),
            }
        )
    return rows


def relative_error(estimate: float | None, measured: float | None) -> float | None:
    """(estimate - measured) / measured: +0.5 means the estimate was 50 % too long."""
    if estimate is None or not measured:
        return None
    return round((estimate - measured) / measured, 3)


def estimate_errors(work: dict, wall_s: float) -> dict:
    """The estimate's total against the whole process (loading, probe and writing included),
    against every stage timed, and against only the stages it estimated."""
    total = (work.get("estimate") or {}).get("seconds")
    rows = stage_rows(work)
    stages = sum(r["actual_s"] or 0.0 for r in rows)
    estimated = sum(r["actual_s"] or 0.0 for r in rows if r["estimated_s"] is not None)
    return {
        "estimate_s": total,
        "wall_s": round(wall_s, 2),
        "stages_s": round(stages, 2),
        "estimated_stages_s": round(estimated, 2),
        "error_vs_wall": relative_error(total, wall_s),
        "error_vs_stages": relative_error(total, stages),
        "error_vs_estimated_stages": relative_error(total, estimated),
    }


def markdown_table(rows: list[dict]) -> str:
    def cell(x) -> str:
        return "" if x is None else str(x)

    head = ["stage", "estimated s", "took s", "error", "denoiser calls", "block calls", "work"]
    keys = ["stage", "estimated_s", "actual_s", "error", "denoiser_calls", "block_calls", "work"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


# -- the machine -----------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        None,
    )
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__,
        "diffusers": metadata.version("diffusers"),
    }


# -- the command -----------------------------------------------------------------------------


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Build (or reuse) the folder, quantize, reload, re-plan; the record's fields."""
    from quantization.types import RECIPES

    work.mkdir(parents=True, exist_ok=True)
    folder, prompts = prepare(args.model, args.layers, work)
    conditions = conditions_args(prompts)
    placement = {"device": args.device, "dtype": args.dtype}
    out = work / f"art-{args.recipe}"
    shutil.rmtree(out, ignore_errors=True)
    q_args = quantize_args(
        folder,
        args.recipe,
        out,
        conditions,
        args.steps,
        max_minutes=args.max_minutes,
        **placement,
    )
    print(f"running {shown(q_args)}", file=sys.stderr, flush=True)
    q = run_logged(q_args, work / f"{args.recipe}.log", work / f"{args.recipe}.stdout")
    record: dict = {
        "quantize_command": shown(q_args),
        "quantize": {"rc": q.rc, "wall_s": round(q.seconds, 2), "error": q.error()},
    }
    if q.rc != 0:
        return record
    manifest = json.loads((out / "manifest.json").read_text())
    work_json = manifest.get("work", {})
    record["quantize"].update(estimate_errors(work_json, q.seconds))
    record.update(
        effort=(work_json.get("estimate") or {}).get("effort"),
        stages=stage_rows(work_json),
        calls_recorded="calls" in work_json,
        measured=manifest.get("measured"),
        sizes=manifest.get("sizes"),
        reload=reload(out),
    )
    target = args.replan_target
    if target is None:
        target = RECIPES[args.recipe].target_sqnr_db + REPLAN_DB
    replanned = work / f"art-{args.recipe}-replan"
    shutil.rmtree(replanned, ignore_errors=True)
    r_args = replan_args(
        folder, out / "analysis", target, replanned, conditions, args.steps, **placement
    )
    print(f"running {shown(r_args)}", file=sys.stderr, flush=True)
    r = run_logged(
        r_args, work / f"{args.recipe}-replan.log", work / f"{args.recipe}-replan.stdout"
    )
    record["replan_command"] = shown(r_args)
    record["replan"] = {
        "target_sqnr_db": target,
        "rc": r.rc,
        "wall_s": round(r.seconds, 2),
        "no_new_measurement": REPLAN_PHRASE in r.stderr,
        "error": r.error(),
    }
    if r.rc == 0:
        replan_manifest = json.loads((replanned / "manifest.json").read_text())
        record["replan"]["actual"] = replan_manifest.get("work", {}).get("actual")
        record["replan"]["measured"] = replan_manifest.get("measured")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.quantize_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--recipe", choices=("w8a8", "w4a8-sqnr"), required=True)
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--work", type=Path, help=f"default {WORK}/<model>[-L<layers>]")
    p.add_argument(
        "--layers",
        type=int,
        help="transformer blocks (DiT-XL/2: 28) or layers per UNet block (SD 1.5: 2); "
        "fewer for a dry run",
    )
    p.add_argument(
        "--replan-target",
        type=float,
        help=f"re-plan's --target-sqnr, dB (default: the recipe's + {REPLAN_DB:g})",
    )
    p.add_argument("--max-minutes", type=float, help="passed to quantize (default: its own)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument(
        "--out",
        type=Path,
        help="default bench/results/quantize-cost-<model>-<recipe>-<device>.json",
    )
    args = p.parse_args(argv)
    work = args.work or work_dir(args.model, args.layers)
    record = measure(args, work)
    out = args.out or RESULTS / f"quantize-cost-{args.model}-{args.recipe}-{args.device}.json"
    save(
        out,
        "python -m bench.quantize_cost " + " ".join(sys.argv[1:] if argv is None else argv),
        model=args.model,
        recipe=args.recipe,
        device=args.device,
        dtype=args.dtype,
        steps=args.steps,
        layers=args.layers,
        work=str(work),
        **machine_info(args.device),
        **record,
    )
    if "stages" in record:
        print(markdown_table(record["stages"]))
        q = record["quantize"]
        print(
            f"\nwhole process {q['wall_s']} s, stages {q['stages_s']} s; estimate "
            f"{q['estimate_s']} s (error {q['error_vs_wall']} vs the process, "
            f"{q['error_vs_stages']} vs the stages)"
        )
    print(f"wrote {out}")
    return 0 if record["quantize"]["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
