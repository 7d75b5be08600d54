"""How a benchmark command writes its result: JSON labelled with the command, date and machine."""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import date
from pathlib import Path

__all__ = ["machine", "positive_int", "save"]


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (rounds, repeats)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores"


def save(path: Path, command: str, **fields) -> dict:
    """Write ``fields`` to ``path`` under the command, today's date and the machine."""
    record = {"command": command, "date": date.today().isoformat(), "machine": machine(), **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record
