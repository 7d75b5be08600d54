"""The sensitivity table: every unit x level with its relative SQNR and bytes, and what it was
measured on. Torch-free: it is what ``analyze --out`` saves and ``quantize --analysis`` plans
from, without measuring again.

While measuring, each row is appended to a journal (one JSON line, flushed) so an interrupted
analysis goes on from the last unit it measured (``--resume``); the journal's first line says
what the rows were measured on, and a resume on anything else is refused.

End-to-end corrections: a unit's relative SQNR is measured from the recording (at one denoiser
step, or at its block's output); the sampler compounds noise over the steps differently for
different units. ``end_to_end`` holds the units a check blamed and measured end to end, and
``offset_db`` what the rest lose on the way, fitted on the checks (``predicted - measured``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantization.plan import BlockOption

__all__ = ["Check", "Entry", "SensitivityTable", "Unit", "read_journal"]

TABLE_FILE = "sensitivity_table.json"
JOURNAL_FILE = "journal.jsonl"


@dataclass(frozen=True)
class Unit:
    """What the planner gives a level to: a block, or one module inside a block."""

    name: str
    block: str
    layers: tuple[str, ...]


@dataclass(frozen=True)
class Entry:
    """One unit at one level: relative SQNR (dB; None: infinite, nothing changed), bytes of its
    layers, bytes of its weights that multiply float activations at that level, and its
    layers' latency on the device (ms; None: not measured, ``quantization.latency``)."""

    unit: str
    level: str
    sqnr_db: float | None
    weight_bytes: int
    float_matmul_bytes: int
    latency_ms: float | None = None


@dataclass(frozen=True)
class Check:
    """A plan sampled end to end: its predicted and measured latent SQNR, and its bytes."""

    predicted_db: float | None
    measured_db: float | None
    layer_bytes: int
    levels: dict[str, str]
    seconds: float | None = None  # the quantized sampling: what a later check will cost


def _db(x: float | None) -> float:
    return math.inf if x is None else x


def _json_db(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else round(x, 4)


@dataclass
class SensitivityTable:
    """Everything the planner needs, and what it was measured on (``measured_on``)."""

    measured_on: dict
    units: list[Unit]
    levels: list[str]
    entries: dict[tuple[str, str], Entry] = field(default_factory=dict)
    end_to_end: dict[str, dict[str, float | None]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    offset_db: float = 0.0
    fixed_bytes: int = 0

    # --- the planner's view -------------------------------------------------------------------

    def unit_offset(self, unit: str, level: str) -> float:
        """dB a unit loses from its recorded measurement to the end of sampling."""
        e2e = self.end_to_end.get(unit, {})
        measured = e2e.get(level)
        if level in e2e and measured is not None:
            return _db(self.entries[(unit, level)].sqnr_db) - measured
        known = [
            _db(self.entries[(unit, lv)].sqnr_db) - v
            for lv, v in e2e.items()
            if v is not None and not math.isinf(_db(self.entries[(unit, lv)].sqnr_db))
        ]
        return sum(known) / len(known) if known else self.offset_db

    def options(self, end_to_end: bool = True) -> dict[str, list[BlockOption]]:
        """Per unit, its levels from the base up; SQNR predicted at the end of sampling
        (``end_to_end``) or as measured."""
        out: dict[str, list[BlockOption]] = {}
        for u in self.units:
            opts = []
            for level in self.levels:
                e = self.entries[(u.name, level)]
                db = _db(e.sqnr_db)
                if end_to_end and not math.isinf(db):
                    db -= self.unit_offset(u.name, level)
                opts.append(
                    BlockOption(level, db, e.weight_bytes, e.float_matmul_bytes, e.latency_ms)
                )
            out[u.name] = opts
        return out

    def base_layer_bytes(self) -> int:
        return sum(self.entries[(u.name, self.levels[0])].weight_bytes for u in self.units)

    def complete(self) -> bool:
        return all((u.name, lv) in self.entries for u in self.units for lv in self.levels)

    def fit_offset(self, check: Check, noise_by_unit: dict[str, float]) -> None:
        """Set ``offset_db`` so that the checked plan's prediction meets its measurement:
        the refined units' noise as measured end to end, the rest's scaled by one factor."""
        if check.measured_db is None:
            return
        measured = 10.0 ** (-check.measured_db / 10.0)
        refined = sum(n for u, n in noise_by_unit.items() if u in self.end_to_end)
        rest_at_offset = sum(n for u, n in noise_by_unit.items() if u not in self.end_to_end)
        if rest_at_offset <= 0:
            return
        rest_recorded = rest_at_offset * 10.0 ** (-self.offset_db / 10.0)
        left = measured - refined
        if left <= 0:  # the refined units explain it all: the rest matter less than thought
            self.offset_db -= 3.0
            return
        self.offset_db = 10.0 * math.log10(left / rest_recorded)

    # --- JSON -----------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "measured_on": self.measured_on,
            "levels": self.levels,
            "units": [asdict(u) for u in self.units],
            "entries": [
                {**asdict(e), "sqnr_db": None if e.sqnr_db is None else round(e.sqnr_db, 4)}
                for e in self.entries.values()
            ],
            "end_to_end": self.end_to_end,
            "checks": [asdict(c) for c in self.checks],
            "offset_db": round(self.offset_db, 4),
            "fixed_bytes": self.fixed_bytes,
        }

    @classmethod
    def from_json(cls, raw: dict) -> SensitivityTable:
        table = cls(
            measured_on=raw["measured_on"],
            units=[Unit(u["name"], u["block"], tuple(u["layers"])) for u in raw["units"]],
            levels=list(raw["levels"]),
            end_to_end={k: dict(v) for k, v in raw.get("end_to_end", {}).items()},
            checks=[Check(**c) for c in raw.get("checks", [])],
            offset_db=float(raw.get("offset_db", 0.0)),
            fixed_bytes=int(raw.get("fixed_bytes", 0)),
        )
        for e in raw["entries"]:
            table.entries[(e["unit"], e["level"])] = Entry(**e)
        if not table.complete():
            raise ValueError("the sensitivity table misses units: analyze again (or --resume)")
        return table

    def save(self, folder: Path) -> Path:
        path = Path(folder) / TABLE_FILE
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> SensitivityTable:
        path = Path(folder) / TABLE_FILE
        if not path.is_file():
            raise ValueError(f"{folder} holds no {TABLE_FILE}: is it an analyze --out folder?")
        return cls.from_json(json.loads(path.read_text()))


class Journal:
    """Rows appended as they are measured; a resumed analysis reads them back."""

    def __init__(self, folder: Path | None, header: dict, resume: bool) -> None:
        self.path = None if folder is None else Path(folder) / JOURNAL_FILE
        self.done: dict[tuple[str, str], Entry] = {}
        self.end_to_end: dict[str, dict[str, float | None]] = {}
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.is_file():
            first, rows = read_journal(self.path)
            if first != header:
                changed = sorted(
                    k for k in set(first) | set(header) if first.get(k) != header.get(k)
                )
                raise ValueError(
                    f"--resume: {self.path} was measured with other settings "
                    f"({', '.join(changed)}); give the same flags, or analyze anew into "
                    "another --out"
                )
            for row in rows:
                if row["kind"] == "entry":
                    e = Entry(**{k: v for k, v in row.items() if k != "kind"})
                    self.done[(e.unit, e.level)] = e
                elif row["kind"] == "end_to_end":
                    self.end_to_end.setdefault(row["unit"], {})[row["level"]] = row["sqnr_db"]
            return
        if not resume and self.path.is_file():
            raise ValueError(
                f"{self.path} exists: pass --resume to go on from it, or choose a new --out"
            )
        self._write({"kind": "header", **header}, "w")

    def _write(self, row: dict, mode: str = "a") -> None:
        if self.path is None:
            return
        with self.path.open(mode) as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def add(self, entry: Entry) -> None:
        self.done[(entry.unit, entry.level)] = entry
        self._write({"kind": "entry", **asdict(entry)})

    def add_end_to_end(self, unit: str, level: str, sqnr: float) -> None:
        value = _json_db(sqnr)
        self.end_to_end.setdefault(unit, {})[level] = value
        self._write({"kind": "end_to_end", "unit": unit, "level": level, "sqnr_db": value})


def read_journal(path: Path) -> tuple[dict, list[dict]]:
    """The header (without its kind) and the rows of a journal; a torn last line is dropped."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # written while interrupted
    if not rows or rows[0].get("kind") != "header":
        raise ValueError(f"{path} is not a journal of this analysis")
    header = {k: v for k, v in rows[0].items() if k != "kind"}
    return header, rows[1:]
