"""The embedded models: the colored-digits data, the recipe that trains them, their evaluator.

Everything digits-specific lives here; ``pipelines`` and ``quantization`` work on any
diffusers pipeline and ask ``embedded_model`` whether a folder is one of ours.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.loader import read_defaults

EMBEDDED = ("dit-digits", "t2i-digits")


def embedded_model(source: str | Path) -> str | None:
    """The name of the embedded model a folder holds (its defaults.json says so), else None."""
    if not Path(source).is_dir():
        return None
    try:
        name = read_defaults(source).get("model")
    except (ValueError, AttributeError):
        return None
    return name if name in EMBEDDED else None
