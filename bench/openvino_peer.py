"""The CPU peer: OpenVINO (f32, bf16) and NNCF's int8 on the very weights and inputs of
bench.full_size, run by it (``--peer openvino``) in the peer's own venv (``make peer``).

    .venv-peer/bin/python -m bench.openvino_peer --arch dit-xl-2 --out peer.json

The same random-weight model (same constructor, seed, torch and diffusers) is converted with
``ov.convert_model`` to static shapes (batch 2), and compiled three ways on the CPU plugin:

- ``openvino-f32``: ``INFERENCE_PRECISION_HINT=f32``;
- ``openvino-bf16``: ``bf16``, what the plugin runs by default on CPUs with AVX-512 BF16;
- ``openvino-int8``: ``nncf.quantize`` on calibration inputs spread over the timesteps of the
  same trajectory, with the recipe that measured best here (``ModelType.TRANSFORMER``:
  quantized inputs of MatMul / Conv only; SmoothQuant off, it cost up to 18 dB on DiT: see
  ../shared/OPENVINO_NOTES.md), the rest at the plugin's default (bf16 here).

Each is timed on bench.full_size's timing call (median of ``--repeats`` after a warm-up, 2
threads, latency hint) and its SQNR taken against torch fp32 on the same trajectory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.full_size import ARCHS, make_calls
from quality.metrics import sqnr_db
from quantization.capture import Call, replay

CALIBRATION_TIMESTEPS = [999, 874, 749, 624, 499, 374, 249, 124]
THREADS = 2


class _Wrapped(torch.nn.Module):
    """The denoiser as a function of three tensors: latents, timestep, condition."""

    def __init__(self, model: torch.nn.Module, condition: str) -> None:
        super().__init__()
        self.model, self.condition = model, condition

    def forward(self, x, t, cond):
        return self.model(x, timestep=t, return_dict=False, **{self.condition: cond})[0]


def _inputs(call: Call, condition: str) -> dict[str, np.ndarray]:
    return {
        "x": call.args[0].numpy(),
        "t": call.kwargs["timestep"].to(torch.int64).numpy(),
        "cond": call.kwargs[condition].numpy(),
    }


def main(argv: list[str] | None = None) -> None:
    import nncf
    import openvino as ov

    p = argparse.ArgumentParser(prog="python -m bench.openvino_peer", description=__doc__)
    p.add_argument("--arch", default="dit-xl-2", choices=list(ARCHS))
    p.add_argument("--layers", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    build = ARCHS[args.arch][0]
    layers = args.layers or (28 if args.arch == "dit-xl-2" else 2)
    fp = build(torch.float32, "cpu", layers)
    condition = "encoder_hidden_states" if args.arch == "sd15-unet" else "class_labels"
    calibration = make_calls(CALIBRATION_TIMESTEPS, torch.float32, "cpu", arch=args.arch)
    trajectory = make_calls([999, 500], torch.float32, "cpu", arch=args.arch)
    timing = make_calls([500], torch.float32, "cpu", arch=args.arch)[0]
    reference = [o.float() for o in replay(fp, trajectory)]

    t0 = time.perf_counter()
    example = _inputs(timing, condition)
    wrapped = _Wrapped(fp, condition).eval()
    with torch.no_grad():
        model = ov.convert_model(
            wrapped, example_input=tuple(torch.from_numpy(v) for v in example.values())
        )
    for port, name in zip(model.inputs, example, strict=True):
        port.get_tensor().set_names({name})
    model.reshape({name: list(v.shape) for name, v in example.items()})
    convert_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    int8 = nncf.quantize(
        model,
        nncf.Dataset([_inputs(c, condition) for c in calibration]),
        subset_size=len(calibration),
        model_type=nncf.ModelType.TRANSFORMER,
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1, convolution=-1)
        ),
    )
    quantize_s = time.perf_counter() - t0

    core = ov.Core()
    rows = []
    for variant, ov_model, precision in (
        ("openvino-f32", model, "f32"),
        ("openvino-bf16", model, "bf16"),
        ("openvino-int8", int8, "bf16"),
    ):
        compiled = core.compile_model(
            ov_model,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": THREADS,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": precision,
            },
        )
        outputs = [
            torch.from_numpy(np.array(compiled(_inputs(c, condition))[0])) for c in trajectory
        ]
        sqnr = sqnr_db(
            torch.cat([r.flatten() for r in reference]),
            torch.cat([o.flatten().float() for o in outputs]),
        )
        feed = _inputs(timing, condition)
        compiled(feed)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            compiled(feed)
            times.append(time.perf_counter() - start)
        row = {
            "variant": variant,
            "backend": "openvino",
            "compiled": True,
            "inference_precision": precision,
            "step_latency_ms": round(1000 * statistics.median(times), 1),
            "sqnr_random_db": round(sqnr, 2),
            "convert_seconds": round(convert_s, 1),
        }
        if variant == "openvino-int8":
            row["quantize_seconds"] = round(quantize_s, 1)
            row["recipe"] = "nncf.quantize, ModelType.TRANSFORMER, SmoothQuant off, 8 calls"
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(
        json.dumps(
            {"openvino": ov.__version__, "nncf": nncf.__version__, "variants": rows}, indent=1
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
