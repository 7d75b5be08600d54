"""Full-size architecture check: a DiT-XL/2-shaped transformer or an SD-1.5-shaped UNet,
random weights, quantized.

    python -m bench.full_size                          # DiT-XL/2, CPU, fp32 (this machine)
    python -m bench.full_size --arch sd15-unet --variants fp w8a8-static@quanto w4a16-g128
    python -m bench.full_size --device cuda --dtype bf16 \
        --variants fp+compile w8a8@torchao+compile fp8:token@torchao+compile w4a16-g128
    python -m bench.full_size --device cuda --dtype bf16 --variants fp w4a8-sqnr \
        --budget-fp16-ratio 0.35

A variant is ``fp``, ``bf16`` (the float model cast to bfloat16, inputs too) or a recipe,
``:token`` / ``:timestep`` for the activations' granularity, ``@quanto``, ``@torchao`` or
``@x86`` for the backend (default: the recipe's) and ``+compile`` for ``torch.compile`` (timed
after its warm-up; the compile time is reported apart) or ``+freeze`` for ``torch.compile`` with
Inductor's freezing (weights folded into the graph as constants). SQNR-driven recipes are planned on
the calls below and their plans replayed on them (``--checks``: the planner's offset fitted
to each replay). ``--peer openvino`` times OpenVINO on the same weights and inputs in the
same run (``bench.openvino_peer``, in the Python given by ``--peer-python``). ``--rounds N``
times every variant again at the end, in turn, N rounds, and reports each one's median over
them: this shared machine drifts by more than 10 % over a run, variant to variant.

SD-1.5 UNet: UNet2DConditionModel with SD 1.5's configuration (320/640/1280/1280 channels,
2 layers per block, cross-attention on 77 x 768 text states), 64x64x4 latents (512 px images).

DiT-XL/2: 28 layers, hidden 1152, 16 heads, patch 2, 32x32x4 latents (256 px images), 1000
classes. Random weights say nothing about image quality; what this measures is what does not
depend on training: weight bytes of the quantized denoiser against fp16, the latency of one
denoiser step (batch 2: a label and the null label of classifier-free guidance) and, on CUDA,
peak memory. The SQNR numbers it prints are for random weights and random inputs only.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel

from quality.metrics import sqnr_db
from quantization import backends
from quantization.api import analyze_denoiser, quantize_denoiser
from quantization.artifact import DTYPES
from quantization.capture import Call, replay
from quantization.types import get_recipe

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_VARIANTS = [
    "fp",
    "fp+compile",
    "fp+freeze",
    "bf16+compile",
    "w8a8-static@x86+compile",
    "w8a8-static:timestep@x86+compile",
    "w8a8-static:token@x86+compile",
    "w8a8-static-sqnr@x86+compile",
    "w8a8-static:token@torchao+compile",
    "w4a16-g128@quanto",
]


ANCHORS = ("fp+compile", "fp+freeze", "openvino-f32", "openvino-bf16", "openvino-int8")
FLOAT = {"fp": None, "bf16": torch.bfloat16}  # float variants: the model's dtype, or cast to


def parse_variant(text: str) -> tuple[str, str | None, str | None, bool]:
    """ "w8a8:token@torchao+compile" -> (recipe, "fp" or "bf16"), granularity, backend,
    compiled (``+compile`` or ``+freeze``)."""
    name = text.removesuffix("+compile").removesuffix("+freeze")
    compiled = text.endswith(("+compile", "+freeze"))
    name, _, backend = name.partition("@")
    name, _, granularity = name.partition(":")
    if name not in FLOAT:
        get_recipe(name)  # an unknown recipe fails here, before anything is built
    return name, granularity or None, backend or None, compiled


def dit_xl_2(dtype: torch.dtype, device: str, layers: int = 28) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        patch_size=2,
        sample_size=32,
        num_embeds_ada_norm=1000,
    )
    return model.to(device=device, dtype=dtype).eval()


def sd15_unet(dtype: torch.dtype, device: str, layers: int = 2) -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=layers,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    return model.to(device=device, dtype=dtype).eval()


def sd_vae(latent_channels: int = 4, **config):
    """The VAE of SD 1.5 (sd-vae-ft-ema: 128/256/512/512 channels, 4 latent channels), or
    with ``latent_channels=16`` and Flux's ``config`` (scaling and shift factors, no quant
    convs) Flux's; random weights (seed before calling for fixed ones), fp32 on the CPU."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=latent_channels,
        **config,
    )


def clip_l(tokenizer):
    """The CLIP ViT-L/14 text tower of SD 1.5 and Flux (123 M parameters), random weights,
    its special tokens the tokenizer's."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def make_calls(
    timesteps: list[int], dtype: torch.dtype, device: str, batch: int = 2, arch: str = "dit-xl-2"
) -> list[Call]:
    g = torch.Generator().manual_seed(1)
    calls = []
    for i, t in enumerate(timesteps):
        size = 64 if arch == "sd15-unet" else 32
        x = torch.randn(batch, 4, size, size, generator=g).to(device=device, dtype=dtype)
        if arch == "sd15-unet":
            text = torch.randn(batch, 77, 768, generator=g).to(device=device, dtype=dtype)
            calls.append(
                Call(
                    i,
                    (x,),
                    {
                        "timestep": torch.full((batch,), t, device=device),
                        "encoder_hidden_states": text,
                    },
                )
            )
            continue
        kwargs = {
            "timestep": torch.full((batch,), t, device=device),
            "class_labels": torch.tensor(
                [207, 1000][:batch] + [0] * max(0, batch - 2), device=device
            ),
        }
        calls.append(Call(i, (x,), kwargs))
    return calls


ARCHS = {
    "dit-xl-2": (
        dit_xl_2,
        "DiT-XL/2 shape ({layers} layers, hidden 1152, 16 heads, patch 2, 32x32x4), random weights",
        "full_size-{device}.json",
    ),
    "sd15-unet": (
        sd15_unet,
        "SD-1.5 UNet shape (320/640/1280/1280, {layers} layers per block, cross-attention "
        "77x768, 64x64x4), random weights",
        "full_size-sd15-unet-{device}.json",
    ),
}


def cast_calls(calls: list[Call], dtype: torch.dtype) -> list[Call]:
    """The calls with their floating-point tensors in ``dtype`` (timesteps, labels kept)."""

    def cast(v):
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return [
        Call(c.step, tuple(cast(a) for a in c.args), {k: cast(v) for k, v in c.kwargs.items()})
        for c in calls
    ]


def step_latency_ms(model, call: Call, device: str, repeats: int, warm: bool = True) -> float:
    """The median of ``repeats`` calls, after one that warms up (``warm``: not timed)."""
    times = []
    with torch.no_grad():  # quanto tensors do not support inference mode
        for i in range(repeats + warm):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(*call.args, **call.kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            if i or not warm:  # the first call warms up (kernels, extension builds)
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.full_size",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", default="dit-xl-2", choices=list(ARCHS))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="default: %(default)s")
    p.add_argument("--repeats", type=int, default=3, help="timed denoiser calls per variant")
    p.add_argument(
        "--checks",
        type=int,
        default=2,
        help="SQNR-driven recipes: plans replayed on the calls, the planner's offset fitted to "
        "each (0: the plan as the block-scope measurements predict it)",
    )
    p.add_argument(
        "--budget-fp16-ratio",
        type=float,
        help="w4a8-sqnr: cap the quantized denoiser at this many times its fp16 bytes "
        "(default: the planner's own budget, 1.2x what the base recipe makes it weigh)",
    )
    p.add_argument(
        "--layers",
        type=int,
        help="transformer blocks (DiT-XL/2: 28) or layers per UNet block (SD 1.5: 2); "
        "fewer for a dry run",
    )
    p.add_argument(
        "--out", type=Path, help="JSON file (default bench/results/full_size-<device>.json)"
    )
    p.add_argument(
        "--peer",
        choices=("openvino",),
        help="also time OpenVINO f32 / bf16 / NNCF int8 on the same weights and inputs, in "
        "this run (bench.openvino_peer, in --peer-python)",
    )
    p.add_argument(
        "--peer-python",
        default=".venv-peer/bin/python",
        help="the Python that has openvino and nncf (default: %(default)s, `make peer`)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="after every variant is measured, time them all again once per round, in turn, "
        "and report each one's median over the rounds (keeps every variant in memory)",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="a variant that fails is recorded with its error and the run goes on to the next",
    )
    p.add_argument(
        "--markdown",
        type=Path,
        metavar="RESULTS_JSON",
        help="print the table of a results file written by this command, and stop",
    )
    args = p.parse_args(argv)
    if args.markdown is not None:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    dtype, device = DTYPES[args.dtype], args.device
    build, description, filename = ARCHS[args.arch]
    layers = args.layers or (28 if args.arch == "dit-xl-2" else 2)
    out = args.out or RESULTS / filename.format(device=device)
    fp = build(dtype, device, layers)
    params = sum(p.numel() for p in fp.parameters())
    calibration = make_calls([999], dtype, device, arch=args.arch)
    trajectory = make_calls([999, 500], dtype, device, arch=args.arch)
    timing_call = make_calls([500], dtype, device, arch=args.arch)[0]
    reference = [o.float().cpu() for o in replay(fp, trajectory)]
    rows: list[dict] = []
    peer = None
    if args.peer:  # first: its process then shares the machine with the FP model alone
        peer = run_peer(args.peer_python, args.arch, layers, args.repeats)
    header = {
        "model": description.format(layers=layers),
        "parameters": params,
        "fp16_bytes": params * 2,
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch": 2,
        "command": "python -m bench.full_size " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "peer": None if peer is None else {k: v for k, v in peer.items() if k != "variants"},
    }
    peer_rows = [] if peer is None else peer["variants"]
    calls = {"calibration": calibration, "trajectory": trajectory, "timing": [timing_call]}
    kept: dict[str, tuple[Callable, Call]] = {}  # --rounds: each variant's runner and call
    for variant in args.variants:
        try:
            row, runner = measure(variant, fp, params, calls, reference, args)
            if args.rounds:
                kept[variant] = runner
            del runner
        except Exception as e:  # recorded, and the run goes on when asked
            if not args.keep_going:
                raise
            traceback.print_exc()
            row = {"variant": variant, "error": f"{type(e).__name__}: {e}"[:500]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()  # the variant's models went with measure()'s frame
        torch._dynamo.reset()
        if args.device == "cuda":
            fp.to(args.device)
        # every row as it comes: a run killed later (out of memory) keeps what it measured
        _write(out, header, rows + peer_rows, complete=False)
    if kept:
        interleave(kept, rows, args)
    _write(out, header, rows + peer_rows, complete=True)
    print(f"wrote {out}")


def measure(
    variant: str,
    fp: torch.nn.Module,
    params: int,
    calls: dict[str, list[Call]],
    reference: list[torch.Tensor],
    args: argparse.Namespace,
) -> tuple[dict, tuple[Callable, Call]]:
    """One variant's row: built (quantized, planned where its recipe is SQNR-driven) from
    ``fp``, its SQNR on the trajectory against ``reference``, its step time (compiled after
    a warm-up call where asked) and its bytes; on CUDA, its peak memory alone. Also what
    runs one step of it (its runner and the timing call), for ``--rounds``."""
    device = args.device
    calibration, trajectory = calls["calibration"], calls["trajectory"]
    calls = {"trajectory": trajectory, "timing": calls["timing"]}
    name, granularity, backend, compiled = parse_variant(variant)
    frozen = variant.endswith("+freeze")
    print(f"[{variant}] quantizing", flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    extra: dict = {}
    impl = None
    if name in FLOAT:
        model = fp
        if FLOAT[name] is not None:  # a bf16 copy, its inputs cast the same way
            model = copy.deepcopy(fp).to(FLOAT[name])
            calls = {k: cast_calls(v, FLOAT[name]) for k, v in calls.items()}
    else:
        recipe = get_recipe(name).with_granularity(granularity)
        backend = backend or recipe.backend
        impl = backends.get(backend)
        if recipe.mixed_precision:
            budget = None
            if args.budget_fp16_ratio is not None:
                budget = int(args.budget_fp16_ratio * params * 2)
            # random weights, no pipeline: each unit measured on its block alone
            result = analyze_denoiser(
                fp,
                recipe,
                calibration,
                trajectory,
                backend=backend,
                scope="block",
                budget_bytes=budget,
                checks=args.checks,
            )
            model = result.model
            extra = {
                "budget_bytes": budget,
                "levels": dict(sorted(_counts(result.choice.levels).items())),
                "predicted_sqnr_db": round(result.choice.predicted_sqnr_db, 3),
                "time_sensitive_layers": len(result.treatments.time_sensitive),
                "smoothed_layers": len(result.treatments.smoothing),
                "latency_timings": result.table.measured_on.get("latency_timings"),
                "replayed_checks": [
                    {"predicted_db": c.predicted_db, "measured_db": c.measured_db}
                    for c in result.table.checks
                ],
            }
        else:
            model = quantize_denoiser(fp, recipe, calibration, backend=backend).model
    quantize_seconds = time.perf_counter() - start
    nbytes = (
        sum(p.numel() * p.element_size() for p in model.parameters())
        if impl is None
        else impl.nbytes(model)
    )
    sqnr = None
    if name != "fp":
        test = [o.float().cpu() for o in replay(model, calls["trajectory"])]
        sqnr = round(
            sqnr_db(
                torch.cat([r.flatten() for r in reference]),
                torch.cat([t.flatten() for t in test]),
            ),
            2,
        )
    if device == "cuda":
        if name != "fp":
            fp.cpu()  # the peak below is then the quantized model's alone
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    runner, compile_seconds = model, None
    timing = calls["timing"][0]
    if compiled:
        runner = torch.compile(model)
        t0 = time.perf_counter()
        # +freeze: Inductor folds the weights into the graph as constants (its CPU path
        # then packs them for oneDNN once); the compiling call is where it happens
        with torch.no_grad(), torch._inductor.config.patch(freezing=frozen):
            runner(*timing.args, **timing.kwargs)
        compile_seconds = round(time.perf_counter() - t0, 1)
    latency = step_latency_ms(runner, timing, device, args.repeats)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    row = {
        "variant": variant,
        "backend": None if impl is None else impl.NAME,
        "compiled": compiled,
        "weight_bytes": nbytes,
        "ratio_to_fp16": round(nbytes / (params * 2), 4),
        "step_latency_ms": round(latency, 1),
        "compile_seconds": compile_seconds,
        "quantize_seconds": round(quantize_seconds, 1),
        "sqnr_random_db": sqnr,
        **extra,
    }
    if peak is not None:
        row["peak_cuda_bytes"] = peak
    return row, (runner, timing)


def interleave(kept: dict[str, tuple[Callable, Call]], rows: list[dict], args) -> None:
    """``--rounds``: every kept variant called once untimed (the dynamo reset between
    variants makes each compile again), then timed once per round, in turn, round after round; its
    ``step_latency_ms`` becomes the median of its rounds (the time it took alone, when it was
    measured, is kept as ``step_latency_ms_alone``). Variants timed minutes apart on a shared
    machine drift apart by more than the gaps between them; interleaved, each round sees the
    same machine. The peer's rows, timed in their own process first, are not re-timed."""
    times: dict[str, list[float]] = {v: [] for v in kept}
    print("[rounds] warming up", flush=True)  # the dynamo reset after each variant: recompiles
    with torch.no_grad():
        for runner, call in kept.values():
            runner(*call.args, **call.kwargs)
    for r in range(args.rounds):
        print(f"[rounds] {r + 1}/{args.rounds}", flush=True)
        for variant, (runner, call) in kept.items():
            times[variant].append(step_latency_ms(runner, call, args.device, 1, warm=False))
    for row in rows:
        if row["variant"] in times:
            row["step_latency_ms_alone"] = row["step_latency_ms"]
            row["step_latency_ms"] = round(statistics.median(times[row["variant"]]), 1)
            row["step_latency_ms_rounds"] = [round(t, 1) for t in times[row["variant"]]]


def _write(out: Path, header: dict, rows: list[dict], complete: bool) -> None:
    record = {**header, "complete": complete, "variants": rows, "ratios": ratios(rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)


def run_peer(python: str, arch: str, layers: int, repeats: int) -> dict:
    """bench.openvino_peer in its own venv, on the same model and inputs; its JSON."""
    if not Path(python).is_file():
        raise SystemExit(f"--peer openvino needs {python}: run `make peer` (its own venv)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        command = [python, "-m", "bench.openvino_peer", "--arch", arch, "--layers", str(layers)]
        command += ["--repeats", str(repeats), "--out", str(out)]
        print("[peer] " + " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=Path(__file__).resolve().parent.parent)
        return json.loads(out.read_text())


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Each variant's step time over the anchors of the same run: torch fp32 compiled (and
    with freezing, where run), and OpenVINO's f32, bf16 and int8 steps where the peer ran."""
    timed = [r for r in rows if "step_latency_ms" in r]  # not the failed ones
    by = {r["variant"]: r["step_latency_ms"] for r in timed}
    anchors = [a for a in ANCHORS if a in by]
    return {
        r["variant"]: {f"over {a}": round(r["step_latency_ms"] / by[a], 3) for a in anchors}
        for r in timed
    }


def markdown(record: dict) -> str:
    """A results file as the table the docs show: step time, its ratios over the run's
    anchors, SQNR against the run's float model, bytes over fp16, a planned variant's levels
    and, on CUDA, peak memory."""
    anchors = [a for a in ANCHORS if any(f"over {a}" in v for v in record["ratios"].values())]
    peaks = any("peak_cuda_bytes" in r for r in record["variants"])
    head = ["variant", "step ms", *[f"× {a}" for a in anchors]]
    head += [f"SQNR vs {record.get('dtype', 'fp32')}", "bytes × fp16"]
    head += ["peak GiB"] if peaks else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in record["variants"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'].splitlines()[0]} |")
            continue
        over = record["ratios"].get(r["variant"], {})
        sqnr = r.get("sqnr_random_db")
        levels = r.get("levels")
        name = r["variant"] + (
            "" if not levels else " (" + ", ".join(f"{k} {v}" for k, v in levels.items()) + ")"
        )
        cells = [
            name,
            f"{r['step_latency_ms']:,.1f}",
            *[f"{over[f'over {a}']:.3f}×" if f"over {a}" in over else "" for a in anchors],
            "" if sqnr is None else f"{sqnr:.2f} dB",
            "" if r.get("ratio_to_fp16") is None else f"{r['ratio_to_fp16']:g}",
        ]
        if peaks:
            peak = r.get("peak_cuda_bytes")
            cells.append("" if peak is None else f"{peak / 2**30:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _counts(levels: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for level in levels.values():
        counts[level] = counts.get(level, 0) + 1
    return counts


if __name__ == "__main__":
    main()
