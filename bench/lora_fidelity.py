"""Does a LoRA adapter do on a quantized variant what it does in full precision?

    python -m bench.lora_fidelity                 # both embedded models, every registry variant
    python -m bench.lora_fidelity --models dit-digits --images 16 --out /tmp/fidelity.json

For each embedded model, its italic adapter (``models/adapters/<model>-italic.safetensors``,
trained by ``python -m models.train lora-italic-*``; the registry's file and sha256 where it
lists the adapter, else the training record's) is attached (``pipelines.lora``: beside the
layers, never merged) to every variant ``models/registry.toml`` lists: fp32 from the model
folder, the quantized ones from their artifacts (``quantization.load_quantized``, eager).
Each variant samples the same
``--images`` evaluation targets (seed 0, image i seeded i; the model's default steps and
guidance) without the adapter and with it at scale 1.0. Measured:

- PSNR of the quantized variant's images against fp32's, without the adapter and with it
  (Q+LoRA against FP+LoRA), and the difference: acceptance, within 1 dB;
- the adapter's effect on the variant: mean slant (``models.slant``) with it minus without,
  and its ratio to fp32's effect: acceptance, within 10 % (0.9 to 1.1);
- digit accuracy (``Evaluator.prompt_accuracy``) without and with;
- to tell a LoRA applied wrongly on a quantized base from a sampling that amplifies the
  same per-step error more: the median of the images' own PSNRs, the SQNR of the final
  latents, and the SQNR of single denoiser calls (quantized against fp32, same inputs: 16
  of fp32's final latents noised again to t = 100 ... 900) without and with the adapter;
- controls that are not quantization (``--control``): fp32's weights rounded to bf16, or
  Gaussian noise on every Linear and Conv2d weight at N dB per layer, sampled without and
  with the adapter, to read a variant's drop against what such a weight error loses;
- one denoiser call at batch 2 (one image under classifier-free guidance: one step of a
  request): the variant as it is, attached with no adapter active, and with the adapter
  active; medians of ``--rounds`` rounds that alternate the three (a load on this shared
  machine weighs on all alike), wall and CPU milliseconds, ``--threads`` torch threads.
  Eager: the registry compiles the w8a8 variants, so these times are not a served
  variant's; they compare the three states of one variant.

Writes bench/results/lora-fidelity.json and .md, with the load average before and after.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
import tomllib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.record import save
from models.evaluator import Evaluator
from models.targets import conditions_for, denoiser_inputs, evaluation_targets
from models.tokenizer import MAX_LENGTH
from pipelines import lora
from pipelines.generate import Samples, is_class_conditional, sample
from pipelines.loader import read_defaults
from quality.metrics import psnr_db, sqnr_db
from quantization.artifact import DTYPES, load_quantized, open_source, read_manifest
from quantization.blocks import denoiser_attr, denoiser_swapped

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = Path(__file__).resolve().parents[1] / "models"
REGISTRY = MODELS / "registry.toml"
ADAPTERS = MODELS / "adapters"
PSNR_TOLERANCE_DB = 1.0
SEED_STRIDE = 1000  # the k-th set of images is seeded k * SEED_STRIDE + i
EFFECT_TOLERANCE = 0.10


def variants(model: str, registry: Path = REGISTRY) -> list[tuple[str, Path, str | None]]:
    """(variant, folder, dtype) of each variant the registry lists for ``model``, in its
    order: a float variant's folder is the model's source (dtype set), a quantized one's its
    artifact (dtype None). Paths are relative to the registry file."""
    spec = tomllib.loads(registry.read_text())["models"][model]
    out = []
    for name, v in spec["variants"].items():
        if "artifact" in v:
            out.append((name, (registry.parent / v["artifact"]).resolve(), None))
        else:
            out.append((name, (registry.parent / spec["source"]).resolve(), v["dtype"]))
    return out


def adapter_file(model: str, registry: Path = REGISTRY) -> tuple[Path, str]:
    """The italic adapter's file and pinned sha256: the registry's entry when the model lists
    one, else ``models/adapters/<model>-italic.safetensors`` and its training record's."""
    entry = tomllib.loads(registry.read_text())["models"][model].get("adapters", {}).get("italic")
    if entry is not None:
        return (registry.parent / entry["file"]).resolve(), entry["sha256"]
    record = json.loads((ADAPTERS / f"{model}-italic.json").read_text())
    return ADAPTERS / f"{model}-italic.safetensors", record["sha256"]


def load_variant(folder: Path, dtype: str | None) -> tuple[Any, torch.dtype]:
    """The variant's pipeline and its compute dtype (what the LoRA branch computes in)."""
    if dtype is None:
        return load_quantized(folder), DTYPES[read_manifest(folder)["dtype"]]
    return open_source(folder, torch_dtype=DTYPES[dtype]), DTYPES[dtype]


def step_inputs(pipe, denoiser: torch.nn.Module, targets) -> dict:
    """One denoiser call of a guided request for one image: batch 2 (cond and uncond)."""
    cfg: Any = denoiser.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.full((2,), 500)
    return denoiser_inputs(pipe, targets[7:8], x, t)


@torch.no_grad()
def step_latency(pipe, attr: str, adapter: lora.Adapter, dtype, inputs, rounds: int) -> dict:
    """Medians of ``rounds`` rounds of four denoiser calls: as loaded, attached with no
    adapter (the branch runs on zeros, as on a compiled variant), attached gated with no
    adapter (the branch skipped, as a worker runs an eager variant), adapter active. Leaves
    the denoiser attached with the adapter active. Also whether the attached call with no
    adapter gives the plain call's output bit for bit."""
    denoiser = getattr(pipe, attr)
    lora.detach(denoiser)
    wall: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    outputs = {}

    def timed(label: str) -> None:
        w, c = time.perf_counter(), time.process_time()
        out = denoiser(**inputs).sample
        cpu[label].append((time.process_time() - c) * 1000)
        wall[label].append((time.perf_counter() - w) * 1000)
        outputs[label] = out

    for _ in range(3):  # warm-up: first calls allocate
        denoiser(**inputs)
    for _ in range(rounds):
        timed("plain")
        lora.attach(denoiser, adapter.max_rank, adapter.layers, dtype=dtype)
        lora.set_adapters(denoiser, [])
        timed("attached")
        lora.set_adapters(denoiser, [(adapter, 1.0)])
        timed("active")
        lora.detach(denoiser)
        lora.attach(denoiser, adapter.max_rank, adapter.layers, dtype=dtype, gated=True)
        timed("gated")
        lora.detach(denoiser)
    lora.attach(denoiser, adapter.max_rank, adapter.layers, dtype=dtype)
    lora.set_adapters(denoiser, [(adapter, 1.0)])

    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 3)

    return {
        "batch": 2,
        "rounds": rounds,
        "plain_ms": med(wall["plain"]),
        "attached_no_adapter_ms": med(wall["attached"]),
        "gated_no_adapter_ms": med(wall["gated"]),
        "adapter_active_ms": med(wall["active"]),
        "cpu_ms": {k: med(v) for k, v in cpu.items()},
        "attached_no_adapter_bit_exact": bool(torch.equal(outputs["plain"], outputs["attached"])),
    }


CALL_TIMESTEPS = (100, 300, 500, 700, 900)
CALL_IMAGES = 16


@torch.no_grad()
def call_inputs(fp_pipe, latents: torch.Tensor, targets) -> list[dict]:
    """Denoiser inputs on the data the adapter shapes: fp32's final latents of the first
    CALL_IMAGES images, noised again to each of CALL_TIMESTEPS (seeded), with their
    conditions (class ids, or prompts encoded by fp32's text encoder)."""
    g = torch.Generator().manual_seed(1)
    x0 = latents[:CALL_IMAGES] * fp_pipe.vae.config.scaling_factor
    n = len(x0)
    if is_class_conditional(fp_pipe):
        condition = {"class_labels": torch.tensor([t.digit for t in targets[:n]])}
        key = "hidden_states"
    else:
        ids = fp_pipe.tokenizer(
            conditions_for(fp_pipe, targets[:n]),
            padding="max_length",
            max_length=MAX_LENGTH,
            return_tensors="pt",
        ).input_ids
        condition = {"encoder_hidden_states": fp_pipe.text_encoder(ids)[0]}
        key = "sample"
    out = []
    for t in CALL_TIMESTEPS:
        a = fp_pipe.scheduler.alphas_cumprod[t]
        x = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
        out.append({key: x, "timestep": torch.full((n,), t), **condition})
    return out


@torch.no_grad()
def call_sqnr(fp_denoiser, q_denoiser, inputs: list[dict]) -> list[float]:
    """SQNR (dB) of the quantized denoiser's predicted noise against fp32's, call by call
    on the same inputs, with whatever adapters both have active."""
    channels = fp_denoiser.config.in_channels
    return [
        round(
            sqnr_db(fp_denoiser(**kw).sample[:, :channels], q_denoiser(**kw).sample[:, :channels]),
            2,
        )
        for kw in inputs
    ]


def _db(x: float) -> float | None:
    return None if math.isinf(x) else round(x, 3)


def sample_sets(pipe, conditions, sets: int, sampling: dict) -> Samples:
    """``sets`` sets of images of ``conditions``, one after the other: the k-th seeded from
    ``k * SEED_STRIDE`` (the first as ``sample(..., seed=0)``)."""
    parts = [sample(pipe, conditions, seed=k * SEED_STRIDE, **sampling) for k in range(sets)]
    return Samples(np.concatenate([p.images for p in parts]), torch.cat([p.latents for p in parts]))


def _per_set(
    metric: Callable[[np.ndarray, np.ndarray], float], ref: np.ndarray, got: np.ndarray, sets: int
) -> list[float | None]:
    """``metric(ref, got)`` of each set of images (``sample_sets``) on its own."""
    n = len(ref) // sets
    return [_db(metric(ref[k * n : (k + 1) * n], got[k * n : (k + 1) * n])) for k in range(sets)]


def psnr_per_set(ref: np.ndarray, got: np.ndarray, sets: int) -> list[float | None]:
    """PSNR of each set of images (``sample_sets``) on its own."""
    return _per_set(psnr_db, ref, got, sets)


def median_image_psnr(ref: np.ndarray, got: np.ndarray) -> float:
    """The median of the images' own PSNRs: what a typical image keeps, where the batch's
    PSNR is set by the few images that went another way."""
    return float(np.median([psnr_db(r[None], q[None]) for r, q in zip(ref, got, strict=True)]))


def median_image_psnr_per_set(ref: np.ndarray, got: np.ndarray, sets: int) -> list[float | None]:
    """``median_image_psnr`` of each set of images (``sample_sets``) on its own."""
    return _per_set(median_image_psnr, ref, got, sets)


def psnr_fields(ref: np.ndarray, got: np.ndarray, sets: int, suffix: str) -> dict[str, Any]:
    """PSNRs of ``got`` against ``ref`` over all images and per set, of the batch and of its
    median image, keyed ``psnr_*vs_fp32{suffix}_*``."""
    return {
        f"psnr_vs_fp32{suffix}_db": _db(psnr_db(ref, got)),
        f"psnr_median_per_image_vs_fp32{suffix}_db": _db(median_image_psnr(ref, got)),
        f"psnr_vs_fp32{suffix}_per_set_db": psnr_per_set(ref, got, sets),
        f"psnr_median_per_image_vs_fp32{suffix}_per_set_db": median_image_psnr_per_set(
            ref, got, sets
        ),
    }


def add_weight_noise(denoiser: torch.nn.Module, noise_db: float, seed: int = 0) -> int:
    """Add Gaussian noise to the weight of every Linear and Conv2d of ``denoiser`` (the bases
    under LoRA wrappers included; the adapter's buffers are not weights), each at
    ``noise_db`` against its own weight: sigma = rms(W) * 10^(-noise_db / 20). Seeded. The number
    of layers perturbed."""
    g = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for module in denoiser.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                w = module.weight
                sigma = w.float().pow(2).mean().sqrt() * 10 ** (-noise_db / 20)
                w.add_((torch.randn(w.shape, generator=g) * sigma).to(w.dtype))
                count += 1
    return count


@torch.no_grad()
def control(
    fp: dict,
    attr: str,
    adapter: lora.Adapter,
    conditions,
    sampling: dict,
    sets: int,
    kind: str,
) -> dict:
    """The same question asked of an error that is not quantization, ``kind``: ``"bf16"``,
    fp32's base weights rounded to bf16, or a number, Gaussian noise at that many dB per layer
    (``add_weight_noise``); the LoRA buffers exact. Sampled without and with the adapter
    against fp32 without and with it. The drop with the adapter here is what the adapted
    model's sampling does to a weight error of that kind; a quantized variant's drop is to be
    read against it."""
    pipe = fp["pipe"]
    noisy = copy.deepcopy(getattr(pipe, attr))
    out: dict[str, Any] = {"control": kind}
    if kind == "bf16":
        for parameter in noisy.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).to(parameter.dtype))
        out["perturbation"] = "fp32 base weights rounded to bf16"
    else:
        noise_db = float(kind)
        out["layers"] = add_weight_noise(noisy, noise_db)
        out["perturbation"] = f"fp32 + Gaussian weight noise at {noise_db:g} dB per layer"
    with denoiser_swapped(pipe, noisy):
        for label, suffix, active in (
            ("without", "", []),
            ("with", "_with_lora", [(adapter, 1.0)]),
        ):
            lora.set_adapters(noisy, active)
            got = sample_sets(pipe, conditions, sets, sampling)
            ref = fp["samples"][label]
            out.update(psnr_fields(ref.images, got.images, sets, suffix))
            out[f"latent_sqnr_vs_fp32{suffix}_db"] = _db(sqnr_db(ref.latents, got.latents))
    out["psnr_delta_db"] = round(out["psnr_vs_fp32_with_lora_db"] - out["psnr_vs_fp32_db"], 3)
    return out


@torch.no_grad()
def measure_model(
    model: str,
    n: int,
    rounds: int,
    threads: int,
    evaluator: Evaluator,
    sets: int = 1,
    controls: tuple[str, ...] = ("bf16", "26"),
) -> dict:
    file, pinned = adapter_file(model)
    adapter = lora.read(file, sha256=pinned)
    defaults = read_defaults(MODELS / model)
    sampling = {k: defaults[k] for k in ("num_inference_steps", "guidance_scale")}
    targets = evaluation_targets(n, with_colors=defaults["kind"] == "text-to-image", seed=0)
    rows: list[dict] = []
    fp: dict[str, Any] = {}  # fp32's pipeline, samples and call inputs: the reference
    for variant, folder, dtype in variants(model):
        print(f"[{model} {variant}] loading {folder.relative_to(MODELS.parent)}", flush=True)
        pipe, compute = load_variant(folder, dtype)
        attr = denoiser_attr(pipe)
        denoiser = getattr(pipe, attr)
        lora.check(adapter, denoiser)
        conditions = conditions_for(pipe, targets)
        inputs = step_inputs(pipe, denoiser, targets)
        default_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        latency = step_latency(pipe, attr, adapter, compute, inputs, rounds)
        torch.set_num_threads(default_threads)
        samples = {}
        start = time.perf_counter()
        for label, active in (("without", []), ("with", [(adapter, 1.0)])):
            lora.set_adapters(denoiser, active)
            samples[label] = sample_sets(pipe, conditions, sets, sampling)
        sampling_s = time.perf_counter() - start
        row: dict[str, Any] = {"variant": variant, "folder": str(folder.relative_to(MODELS))}
        for label in ("without", "with"):
            images = samples[label].images
            accuracy = evaluator.prompt_accuracy(images, list(targets) * sets)
            row[f"slant_{label}"] = round(float(evaluator.slant(images).mean()), 4)
            row[f"digit_accuracy_{label}"] = round(accuracy.digit_accuracy, 4)
            row[f"prompt_accuracy_{label}"] = round(accuracy.prompt_accuracy, 4)
        row["effect"] = round(row["slant_with"] - row["slant_without"], 4)
        if not fp:
            fp = {
                "pipe": pipe,
                "samples": samples,
                "effect": row["effect"],
                "calls": {
                    label: call_inputs(pipe, samples[label].latents, targets) for label in samples
                },
            }
        row["effect_ratio_to_fp32"] = round(row["effect"] / fp["effect"], 4)
        for label, suffix in (("without", ""), ("with", "_with_lora")):
            ref, got = fp["samples"][label], samples[label]
            row.update(psnr_fields(ref.images, got.images, sets, suffix))
            row[f"latent_sqnr_vs_fp32{suffix}_db"] = _db(sqnr_db(ref.latents, got.latents))
        if rows:
            plain, lora_db = row["psnr_vs_fp32_db"], row["psnr_vs_fp32_with_lora_db"]
            delta = None if plain is None or lora_db is None else round(lora_db - plain, 3)
            row["psnr_delta_db"] = delta
            row["psnr_within_1db"] = delta is not None and abs(delta) <= PSNR_TOLERANCE_DB
            row["effect_within_10pct"] = abs(row["effect_ratio_to_fp32"] - 1) <= EFFECT_TOLERANCE
            fp_denoiser = getattr(fp["pipe"], attr)
            for label, active in (("without", []), ("with", [(adapter, 1.0)])):
                lora.set_adapters(fp_denoiser, active)
                lora.set_adapters(denoiser, active)
                row[f"call_sqnr_{label}_db"] = call_sqnr(fp_denoiser, denoiser, fp["calls"][label])
        row["step_latency"] = latency
        row["sampling_seconds"] = round(sampling_s, 1)
        print(f"[{model} {variant}] {row}", flush=True)
        rows.append(row)
        if rows[0] is not row:
            del pipe, denoiser
        gc.collect()
    return {
        "model": model,
        "adapter": {
            "file": str(file.relative_to(MODELS.parent)),
            "sha256": adapter.sha256,
            "rank": adapter.max_rank,
            "layers": len(adapter.layers),
            "scale": 1.0,
        },
        **sampling,
        "images": n,
        "call_timesteps": list(CALL_TIMESTEPS),
        "call_images": CALL_IMAGES,
        "variants": rows,
        "sets": sets,
        "controls": [
            control(fp, denoiser_attr(fp["pipe"]), adapter, conditions, sampling, sets, kind)
            for kind in controls
        ],
    }


def markdown(record: dict) -> str:
    lines = [
        "# LoRA fidelity on quantized variants: the italic adapters",
        "",
        f"`{record['command']}`, {record['date']}, {record['machine']}, a shared machine (1-minute "
        f"load average {record['load_average_1min']['start']} at the start, "
        f"{record['load_average_1min']['end']} at the end); {record['wall_seconds']} s. "
        f"{record['images']} images per variant (evaluation targets, seed 0)"
        + (
            f", in {record['sets']} sets seeded {SEED_STRIDE} apart (k × {SEED_STRIDE} + i): "
            f"{record['images'] * record['sets']} images, PSNRs over all of them"
            if record.get("sets", 1) > 1
            else ""
        )
        + ", the model's "
        "default steps and guidance, the adapter at scale 1.0 attached beside the layers "
        "(`pipelines.lora`). PSNR against fp32's images (without the adapter: Q vs FP; with "
        "it: Q+LoRA vs FP+LoRA); effect: mean slant with the adapter minus without "
        "(`models.slant`); acceptance: PSNR within 1 dB, effect within 10 % of fp32's.",
        "",
        "| model | variant | PSNR Q vs FP, dB | PSNR Q+LoRA vs FP+LoRA, dB | Δ dB | slant without "
        "| slant with | effect | effect / fp32's | digit acc. without | digit acc. with "
        "| accepted |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def f(v: Any) -> str:
        return "—" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    for m in record["results"]:
        for r in m["variants"]:
            ok = (
                "(reference)"
                if "psnr_delta_db" not in r
                else "yes"
                if r["psnr_within_1db"] and r["effect_within_10pct"]
                else f"no (PSNR {'ok' if r['psnr_within_1db'] else 'out'}, effect "
                f"{'ok' if r['effect_within_10pct'] else 'out'})"
            )
            lines.append(
                f"| {m['model']} | {r['variant']} | {f(r['psnr_vs_fp32_db'])} | "
                f"{f(r['psnr_vs_fp32_with_lora_db'])} | {f(r.get('psnr_delta_db'))} | "
                f"{f(r['slant_without'])} | {f(r['slant_with'])} | {f(r['effect'])} | "
                f"{f(r['effect_ratio_to_fp32'])} | {f(r['digit_accuracy_without'])} | "
                f"{f(r['digit_accuracy_with'])} | {ok} |"
            )
    lines += [
        "",
        "Where a PSNR changes with the adapter: the median of the images' own PSNRs (a few "
        "images that went another way weigh on the batch's), the final latents' SQNR, and the "
        "SQNR of single denoiser calls on the same inputs (fp32's final latents noised again "
        f"to t = {', '.join(map(str, record['results'][0]['call_timesteps']))}), all against "
        "fp32, without / with the adapter; dB.",
        "",
        "| model | variant | median image PSNR | final-latent SQNR | denoiser-call SQNR "
        "without | denoiser-call SQNR with |",
        "|---|---|---:|---:|---|---|",
    ]
    for m in record["results"]:
        for r in m["variants"][1:]:
            lines.append(
                f"| {m['model']} | {r['variant']} | "
                f"{f(r['psnr_median_per_image_vs_fp32_db'])} / "
                f"{f(r['psnr_median_per_image_vs_fp32_with_lora_db'])} | "
                f"{f(r['latent_sqnr_vs_fp32_db'])} / {f(r['latent_sqnr_vs_fp32_with_lora_db'])} | "
                f"{', '.join(map(f, r['call_sqnr_without_db']))} | "
                f"{', '.join(map(f, r['call_sqnr_with_db']))} |"
            )
    lines += [
        "",
        "Controls: errors that are not quantization, fp32's base weights rounded to bf16, or "
        "Gaussian noise added to every Linear and Conv2d weight at the SQNR named (per layer, "
        "against its own weight); the adapter exact. Against fp32, without / with the "
        "adapter. A control's drop with the adapter is what the adapted model's sampling does "
        "to a weight error of that kind; a quantized variant's drop reads against it.",
        "",
        "| model | perturbation | PSNR without, dB | PSNR with, dB | Δ dB | median image PSNR "
        "without / with, dB | final-latent SQNR without / with, dB |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for m in record["results"]:
        for c in m["controls"]:
            lines.append(
                f"| {m['model']} | {c['perturbation']} | {c['psnr_vs_fp32_db']} | "
                f"{c['psnr_vs_fp32_with_lora_db']} | {c['psnr_delta_db']} | "
                f"{f(c.get('psnr_median_per_image_vs_fp32_db'))} / "
                f"{f(c.get('psnr_median_per_image_vs_fp32_with_lora_db'))} | "
                f"{c['latent_sqnr_vs_fp32_db']} / {c['latent_sqnr_vs_fp32_with_lora_db']} |"
            )
    for what, key in (
        ("the batch's PSNR", "psnr_vs_fp32{}_per_set_db"),
        ("the median of the images' own PSNRs", "psnr_median_per_image_vs_fp32{}_per_set_db"),
    ):
        if record.get("sets", 1) == 1 or key.format("") not in record["results"][0]["variants"][1]:
            continue
        lines += [
            "",
            f"Each set of {record['images']} images on its own (set k seeded from "
            f"k × {SEED_STRIDE}), {what}: Q vs FP / Q+LoRA vs FP+LoRA, and Δ, dB.",
            "",
            "| model | variant | " + " | ".join(f"set {k}" for k in range(record["sets"])) + " |",
            "|---|---|" + "---|" * record["sets"],
        ]
        for m in record["results"]:
            rows = [(r["variant"], r) for r in m["variants"][1:]]
            rows += [(f"control: {c['perturbation']}", c) for c in m["controls"]]
            for name, r in rows:
                cells = [
                    f"{f(a)} / {f(b)}" + ("" if a is None or b is None else f" ({b - a:+.3f})")
                    for a, b in zip(r[key.format("")], r[key.format("_with_lora")], strict=True)
                ]
                lines.append(f"| {m['model']} | {name} | " + " | ".join(cells) + " |")
    threads = record["latency_threads"]
    lines += [
        "",
        f"Denoiser call at batch 2 (one guided image: one step), eager, {threads} torch "
        f"thread(s); medians of {record['rounds']} alternating rounds; wall ms (CPU ms).",
        "",
        "| model | variant | as loaded | attached, no adapter | gated, no adapter (eager "
        "in a worker) | adapter active | attached, no adapter: bit-exact |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for m in record["results"]:
        for r in m["variants"]:
            t = r["step_latency"]
            c = t["cpu_ms"]
            lines.append(
                f"| {m['model']} | {r['variant']} | {t['plain_ms']:g} ({c['plain']:g}) | "
                f"{t['attached_no_adapter_ms']:g} ({c['attached']:g}) | "
                f"{t['gated_no_adapter_ms']:g} ({c['gated']:g}) | "
                f"{t['adapter_active_ms']:g} ({c['active']:g}) | "
                f"{'yes' if t['attached_no_adapter_bit_exact'] else 'no'} |"
            )
    adapters = ", ".join(
        f"`{m['adapter']['file']}` (rank {m['adapter']['rank']}, {m['adapter']['layers']} "
        f"layers, sha256 `{m['adapter']['sha256'][:16]}…`)"
        for m in record["results"]
    )
    lines += ["", f"Adapters: {adapters}.", ""]
    return "\n".join(lines)


def control_kind(text: str) -> str:
    """``--control`` values: ``bf16`` or a finite number of dB."""
    if text != "bf16":
        try:
            if not math.isfinite(float(text)):
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"bf16 or dB of SQNR, not {text!r}") from None
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.lora_fidelity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", default=["dit-digits", "t2i-digits"])
    p.add_argument("--images", type=int, default=64)
    p.add_argument(
        "--sets",
        type=int,
        default=1,
        help="sets of --images images, each seeded apart (k * 1000 + i); PSNR over all, and "
        "per set",
    )
    p.add_argument("--rounds", type=int, default=20, help="rounds of the three timed calls")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads of the timed calls (1: steadier)"
    )
    p.add_argument(
        "--control",
        nargs="+",
        default=["bf16", "26"],
        type=control_kind,
        help="controls: bf16 (fp32's weights rounded to bf16) or N (Gaussian weight noise at "
        "N dB of SQNR per layer); one each",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "lora-fidelity.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    load_start = round(os.getloadavg()[0], 2)
    start = time.perf_counter()
    evaluator = Evaluator.load()
    results = [
        measure_model(
            m,
            args.images,
            args.rounds,
            args.threads,
            evaluator,
            args.sets,
            tuple(args.control),
        )
        for m in args.models
    ]
    command = " ".join(["python -m bench.lora_fidelity", *(argv or sys.argv[1:])])
    record = save(
        args.out,
        command,
        load_average_1min={"start": load_start, "end": round(os.getloadavg()[0], 2)},
        wall_seconds=round(time.perf_counter() - start),
        torch_threads=torch.get_num_threads(),
        latency_threads=args.threads,
        rounds=args.rounds,
        images=args.images,
        sets=args.sets,
        results=results,
    )
    args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
