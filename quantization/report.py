"""What an analysis found, as one typed object (``AnalysisReport.to_json()`` is
sensitivity.json), and report.md with its plots (JSON in, files out)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["AnalysisReport", "plot_frontier", "write_report"]


def _r(x: float | None) -> float | None:
    return None if x is None or math.isinf(x) or math.isnan(x) else round(x, 3)


@dataclass
class AnalysisReport:
    """The sensitivity analysis of one recipe on one denoiser, and the plan it led to."""

    recipe: str
    backend: str
    scope: str
    unit: str
    guided: bool
    effort: dict
    levels: list[str]
    units: list[str]
    relative_sqnr: dict[str, dict[str, dict]]  # unit -> level -> {sqnr_db, weight_bytes}
    end_to_end: dict[str, dict[str, float | None]]  # the units checks blamed, measured so
    time_sensitive: dict
    smoothing: dict[str, dict]
    target_sqnr_db: float | None
    budget_bytes: int | None
    budget_ratio: float | None
    fixed_bytes: int
    base_denoiser_bytes: int
    plan_denoiser_bytes: int
    predicted_sqnr_db: float | None
    block_levels: dict[str, str]
    promotions: list[dict]
    checks: list[dict]
    offset_db: float
    measured: dict  # the kept plan: latent SQNR end to end, denoiser SQNR on the recording
    sqnr_vs_step: dict
    frontier: list[dict]
    work: dict  # the plan of work as estimated, and the seconds each stage took
    accumulated_sqnr_db: dict[str, float | None] = field(default_factory=dict)
    per_layer_sqnr: dict[str, dict] = field(default_factory=dict)
    treatment_gains: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> AnalysisReport:
        return cls(**raw)

    @property
    def worst_units(self) -> list[str]:
        base = self.levels[0]
        return sorted(self.units, key=lambda u: self.relative_sqnr[u][base]["sqnr_db"] or math.inf)[
            :2
        ]

    def summary(self) -> dict:
        """What an artifact's manifest keeps of it."""
        return {
            "scope": self.scope,
            "unit": self.unit,
            "effort": self.effort,
            "worst_units": self.worst_units,
            "block_levels": self.block_levels,
            "predicted_sqnr_db": self.predicted_sqnr_db,
            "target_sqnr_db": self.target_sqnr_db,
            "checks": self.checks,
            "time_sensitive_layers": self.time_sensitive.get("layers", []),
            "smoothed_layers": sorted(self.smoothing),
            "treatment_gains": self.treatment_gains,
        }


def _plot_relative(report: AnalysisReport, path: Path) -> None:
    import matplotlib.pyplot as plt

    units = report.units
    levels = [lv for lv in report.levels if lv != "float"]
    fig, ax = plt.subplots(figsize=(min(max(6, 0.3 * len(units)), 40), 3.5))
    width = 0.8 / max(len(levels), 1)
    for i, level in enumerate(levels):
        ys = [report.relative_sqnr[u][level]["sqnr_db"] or 0 for u in units]
        ax.bar([x + i * width for x in range(len(units))], ys, width, label=level)
    ax.set_xticks(
        [x + 0.4 - width / 2 for x in range(len(units))], units, rotation=70, ha="right", fontsize=5
    )
    ax.set_ylabel(f"SQNR at scope {report.scope} (dB)")
    ax.set_title("relative SQNR: only this unit quantized")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_accumulated(acc: dict[str, float | None], base: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(acc)), 3.2))
    ax.plot(range(len(acc)), [v or 0 for v in acc.values()], marker="o")
    ax.set_xticks(range(len(acc)), list(acc), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("denoiser SQNR (dB)")
    ax.set_title(f"accumulated SQNR: blocks 0..b at {base}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(points: list[dict], path: Path, chosen: int | None = None) -> None:
    """Bytes against predicted end-to-end SQNR along the greedy path."""
    import matplotlib.pyplot as plt

    xs = [p["denoiser_bytes"] / 1e6 for p in points if p["predicted_sqnr_db"] is not None]
    ys = [p["predicted_sqnr_db"] for p in points if p["predicted_sqnr_db"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, ys, marker=".", linewidth=1)
    if chosen is not None and points[chosen]["predicted_sqnr_db"] is not None:
        ax.plot(
            [points[chosen]["denoiser_bytes"] / 1e6],
            [points[chosen]["predicted_sqnr_db"]],
            "o",
            color="red",
            label=f"point {chosen}",
        )
        ax.legend(fontsize=7)
    ax.set_xlabel("denoiser MB")
    ax.set_ylabel("predicted latent SQNR (dB)")
    ax.set_title("frontier: the greedy planner's path")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_vs_step(series: dict[str, list], timesteps: list, path: Path) -> None:
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


def frontier_markdown(points: list[dict]) -> str:
    return _table(
        [
            [p["point"], p["denoiser_bytes"], p["predicted_sqnr_db"], p.get("promoted")]
            for p in points
        ],
        ["point", "denoiser bytes", "predicted latent SQNR (dB)", "promotion"],
    )


def write_report(
    out: Path, manifest: dict, report: AnalysisReport | None, sqnr_vs_step: dict
) -> str:
    """Write the plots into ``out`` and return the Markdown that shows them."""
    out = Path(out)
    recipe = manifest["recipe"]
    cal = manifest["calibration"]
    md = [
        f"# {recipe['name']} of {manifest['source']}\n",
        f"{recipe['summary']}.\n",
        "## Sizes\n",
        _table([[k, v] for k, v in manifest["sizes"].items()], ["denoiser", "bytes (or ratio)"]),
        "## Calibration\n",
        f"{cal.get('kind')}, steps {cal.get('steps')}, {cal.get('prompts')} prompts; "
        f"recording {cal.get('record_seconds', 0):.2f} s.\n",
        "## Measured\n",
        _table([[k, v] for k, v in manifest["measured"].items()], ["metric", "value"]),
    ]
    if sqnr_vs_step.get("series"):
        _plot_vs_step(sqnr_vs_step["series"], sqnr_vs_step["timesteps"], out / "sqnr_vs_t.png")
        md += ["## SQNR against t\n", "![SQNR against t](sqnr_vs_t.png)\n"]
    if report is not None:
        md += analysis_markdown(out, report)
    return "\n".join(md)


def analysis_markdown(out: Path, report: AnalysisReport) -> list[str]:
    _plot_relative(report, out / "relative_sqnr.png")
    plot_frontier(report.frontier, out / "frontier.png")
    md = [
        "## Plan of work\n",
        _table(
            [
                [s["name"], s["work"], s["seconds"], report.work.get("actual", {}).get(s["name"])]
                for s in report.work["estimate"]["stages"]
            ],
            ["stage", "work", "estimated s", "took s"],
        ),
        "## Sensitivity\n",
        f"Measured at scope `{report.scope}`, unit `{report.unit}`"
        f"{', on the guided noise' if report.guided else ''}.\n\n",
        "![relative SQNR](relative_sqnr.png)\n",
    ]
    if report.accumulated_sqnr_db:
        _plot_accumulated(
            report.accumulated_sqnr_db, report.levels[0], out / "accumulated_sqnr.png"
        )
        md.append("![accumulated SQNR](accumulated_sqnr.png)\n")
    if report.per_layer_sqnr:
        md.append(
            _table(
                [
                    [n, v["layer_output_sqnr_db"], v["block_output_sqnr_db"]]
                    for n, v in report.per_layer_sqnr.items()
                ],
                [
                    "layer (alone quantized)",
                    "SQNR at its output (dB)",
                    "at its block's output (dB)",
                ],
            )
        )
    budget = "no size budget" if report.budget_bytes is None else f"budget {report.budget_bytes} B"
    md += [
        "## Global treatment: mixed precision\n",
        f"Target {report.target_sqnr_db} dB of latent SQNR, {budget}; "
        f"{report.fixed_bytes} B of the denoiser stay float whatever the plan. "
        f"Predicted {report.predicted_sqnr_db} dB at "
        f"{report.plan_denoiser_bytes} B; offset from recorded to end to end "
        f"{round(report.offset_db, 2)} dB.\n\n",
        _table(
            [
                [i + 1, c["predicted_db"], c["measured_db"], c["layer_bytes"]]
                for i, c in enumerate(report.checks)
            ],
            ["check", "predicted latent SQNR (dB)", "measured (dB)", "layer bytes"],
        ),
        "\n### Frontier\n\n![frontier](frontier.png)\n\n",
        frontier_markdown(report.frontier),
        "## Local treatments\n",
        "Time-sensitive layers, activations kept in float: "
        f"{', '.join(report.time_sensitive.get('layers', [])) or 'none'}.\n\n",
        _table(
            [
                [n, s["alpha"], s["outlier_ratio"], s["sqnr_db_before"], s["sqnr_db_after"]]
                for n, s in report.smoothing.items()
            ],
            ["smoothed layer", "alpha", "outlier ratio", "layer SQNR before (dB)", "after (dB)"],
        ),
    ]
    if report.treatment_gains:
        md.append(
            _table(
                [[k, v] for k, v in report.treatment_gains.items()],
                ["variant", "denoiser SQNR (dB)"],
            )
        )
    return md


def rounded(x: float | None) -> float | None:
    return _r(x)
