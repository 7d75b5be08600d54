"""Does oneDNN multiply the x86 backend's uint8 codes exactly on this CPU?

    python -m bench.x86_codes

One u8 × s8 product, (64 × 512) inputs after a shifted uniform (mostly positive, as after a
GELU) by a (256 × 512) int8 weight per output channel, through ``x86_kernels.linear``, with
the inputs in full-range codes (0..255) and in 7-bit codes (0..127). For each: the SQNR of
the kernel's output against the float product, and of the same codes multiplied exactly in
float. Where the two differ, the kernel saturates (int16 pair sums without VNNI), and
``x86_kernels.U8_MAX`` must be 127 on this CPU. Writes bench/results/x86-codes-<flags>.json.

The other way to keep the pair sums in int16: full-range inputs and 7-bit weights (-63..63,
2 x 255 x 63 < 2^15). Which operand should lose the bit depends on which error dominates, so
both are measured on three inputs: the shifted uniform above, a Gaussian, and a Gaussian with
1 % of its channels ten times larger (outliers, which one static scale per tensor must cover),
the 7-bit weights rounded from the float weight or from the stored int8 weight (what a loader
of an existing artifact would have to do).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from bench.record import save
from quality.metrics import sqnr_db
from quantization.backends import x86_kernels

RESULTS = Path(__file__).resolve().parent / "results"


INPUTS = ("shifted-uniform", "gaussian", "outlier-channels")


def _inputs(kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "shifted-uniform":
        return torch.rand(64, 512, generator=g) * 4 - 0.2
    x = torch.randn(64, 512, generator=g)
    if kind == "outlier-channels":
        x = x * (1 + 9 * (torch.rand(512, generator=g) < 0.01))
    return x


def measure(top: int, weight_max: int = 127, inputs: str = INPUTS[0], via_int8: bool = False):
    g = torch.Generator().manual_seed(0)
    x = _inputs(inputs, g)
    w = torch.randn(256, 512, generator=g) * 0.05
    ref = x @ w.T
    w_scale = w.abs().amax(1) / 127
    wq = (w / w_scale[:, None]).round().clamp(-127, 127)
    if weight_max != 127:
        if via_int8:  # the stored int8 codes rounded again
            wq = (wq * weight_max / 127).round().clamp(-weight_max, weight_max)
        w_scale = w.abs().amax(1) / weight_max
        if not via_int8:
            wq = (w / w_scale[:, None]).round().clamp(-weight_max, weight_max)
    wq = wq.to(torch.int8)
    low, high = float(x.min()), float(x.max())
    zero_point, scale = round(top * -low / (high - low)), (high - low) / top
    xq = (x / scale).round().add(zero_point).clamp(0, top).to(torch.uint8)
    kernel = x86_kernels.linear(xq, zero_point, wq, w_scale) * scale
    exact = ((xq.float() - zero_point) * scale) @ (wq.float() * w_scale[:, None]).T
    return {
        "inputs": inputs,
        "codes": f"0..{top}",
        "weights": f"-{weight_max}..{weight_max}"
        + (" (from the int8 codes)" if via_int8 and weight_max != 127 else ""),
        "kernel_sqnr_db": round(sqnr_db(ref, kernel), 2),
        "exact_sqnr_db": round(sqnr_db(ref, exact), 2),
    }


def main(argv: list[str] | None = None) -> None:
    flags = sorted(x86_kernels.cpu_flags() & x86_kernels.VNNI_FLAGS)
    rows = [measure(255)]  # full-range codes, saturating where the CPU has no VNNI
    for inputs in INPUTS:
        rows += [
            measure(127, 127, inputs),
            measure(255, 63, inputs),
            measure(255, 63, inputs, True),
        ]
    out = RESULTS / f"x86-codes-{'-'.join(flags) or 'no-vnni'}.json"
    command = " ".join(["python -m bench.x86_codes", *(argv or sys.argv[1:])])
    save(out, command, vnni_flags=flags, u8_max=x86_kernels.U8_MAX, results=rows)
    for r in rows:
        print(
            f"{r['inputs']}, codes {r['codes']}, weights {r['weights']}: kernel "
            f"{r['kernel_sqnr_db']} dB, exact {r['exact_sqnr_db']} dB"
        )
    print(f"x86_kernels.U8_MAX here: {x86_kernels.U8_MAX}; wrote {out}")


if __name__ == "__main__":
    main()
