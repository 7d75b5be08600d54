"""report.md and its plots, from the manifest and the sensitivity analysis (JSON in, files out)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_report"]


def _plot_relative(analysis: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    blocks = analysis["blocks"]
    levels = [lv for lv in analysis["levels"] if lv != "float"]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(blocks)), 3.5))
    width = 0.8 / len(levels)
    for i, level in enumerate(levels):
        ys = [analysis["relative_sqnr"][b][level]["sqnr_db"] or 0 for b in blocks]
        ax.bar([x + i * width for x in range(len(blocks))], ys, width, label=level)
    ax.set_xticks(
        [x + 0.4 - width / 2 for x in range(len(blocks))],
        blocks,
        rotation=60,
        ha="right",
        fontsize=7,
    )
    ax.set_ylabel("denoiser SQNR (dB)")
    ax.set_title("relative SQNR: only this block quantized")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_accumulated(analysis: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    acc = analysis["accumulated_sqnr_db"]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(acc)), 3.2))
    ax.plot(range(len(acc)), [v or 0 for v in acc.values()], marker="o")
    ax.set_xticks(range(len(acc)), list(acc), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("denoiser SQNR (dB)")
    ax.set_title(f"accumulated SQNR: blocks 0..b at {analysis['base_level']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_vs_step(series: dict[str, list], timesteps: list[float], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, ys in series.items():
        ax.plot(
            timesteps, [y if y is not None else float("nan") for y in ys], marker=".", label=label
        )
    ax.invert_xaxis()
    ax.set_xlabel("timestep t (sampling runs right to left: T -> 0)")
    ax.set_ylabel("denoiser SQNR (dB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(rows: list[list], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _budget(g: dict) -> str:
    if g["budget_bytes"] is None:
        return "no size budget"
    basis = (
        "given in bytes"
        if g["budget_ratio"] is None
        else f"{g['budget_ratio']}x the {g['base_denoiser_bytes']} B of the base recipe"
    )
    return f"budget {g['budget_bytes']} B for the whole denoiser ({basis})"


def write_report(out: Path, manifest: dict, analysis: dict | None, sqnr_vs_step: dict) -> str:
    """Write the plots into ``out`` and return the Markdown that shows them."""
    out = Path(out)
    sizes = manifest["sizes"]
    recipe = manifest["recipe"]
    cal = manifest["calibration"]
    md = [
        f"# {recipe['name']} of {manifest['source']}\n",
        f"{recipe['summary']}.\n",
        "## Sizes\n",
        _table(
            [[k, v] for k, v in sizes.items()],
            ["denoiser", "bytes (or ratio)"],
        ),
        "## Calibration\n",
        f"{cal['kind']}, steps {cal['steps']}, {cal['prompts']} prompts; "
        f"recording {cal['record_seconds']:.2f} s, quantization {cal['quantize_seconds']:.2f} s.\n",
        "## Measured\n",
        _table([[k, v] for k, v in manifest["measured"].items()], ["metric", "value"]),
    ]
    _plot_vs_step(sqnr_vs_step["series"], sqnr_vs_step["timesteps"], out / "sqnr_vs_t.png")
    md += ["## SQNR against t\n", "![SQNR against t](sqnr_vs_t.png)\n"]
    if analysis is not None:
        _plot_relative(analysis, out / "relative_sqnr.png")
        _plot_accumulated(analysis, out / "accumulated_sqnr.png")
        g = analysis["global"]
        md += [
            "## Sensitivity\n",
            "![relative SQNR](relative_sqnr.png)\n\n![accumulated SQNR](accumulated_sqnr.png)\n",
            f"Worst blocks: {', '.join(analysis['worst_blocks'])}. Per layer inside them:\n\n",
            _table(
                [
                    [n, v["layer_output_sqnr_db"], v["denoiser_sqnr_db"]]
                    for n, v in analysis["per_layer_sqnr"].items()
                ],
                [
                    "layer (alone quantized)",
                    "SQNR at its output (dB)",
                    "at the denoiser output (dB)",
                ],
            ),
            "## Global treatment: mixed precision\n",
            f"Target {g['target_sqnr_db']} dB predicted, {_budget(g)}; {g['fixed_bytes']} B of "
            f"the denoiser stay float whatever the plan. Predicted {g['predicted_sqnr_db']} dB at "
            f"{g['plan_denoiser_bytes']} B ({g['plan_layer_bytes']} B of quantized layers).\n\n",
            _table(
                [
                    [p["block"], p["to"], p["predicted_sqnr_db"], p["layer_bytes"]]
                    for p in g["promotions"]
                ],
                ["promoted block", "to", "predicted SQNR (dB)", "layer bytes after"],
            ),
            "## Local treatments\n",
            "Time-sensitive layers (input range drifts >= "
            f"{analysis['time_sensitive']['threshold_octaves']} "
            f"octave from t = T), activations kept in float: "
            f"{', '.join(analysis['time_sensitive']['layers']) or 'none'}.\n\n",
            _table(
                [
                    [n, s["alpha"], s["outlier_ratio"], s["sqnr_db_before"], s["sqnr_db_after"]]
                    for n, s in analysis["smoothing"].items()
                ],
                [
                    "smoothed layer",
                    "alpha",
                    "outlier ratio",
                    "layer SQNR before (dB)",
                    "after (dB)",
                ],
            ),
            "\nDenoiser SQNR over the trajectory, base recipe with each treatment:\n\n",
            _table(
                [[k, v] for k, v in analysis["treatment_gains"].items()], ["variant", "SQNR (dB)"]
            ),
        ]
    return "\n".join(md)
