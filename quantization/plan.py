"""The plan: per layer, how it is quantized. Plain JSON keyed by module name.

The shape of quanto's ``quantization_map`` (``{"weights": "qint4", "activations": "qint8"}``,
``"none"`` for float activations) plus our fields: the group size quanto does not record, the
block the layer belongs to, the SmoothQuant alpha if smoothed, and whether it was found
time-sensitive. It is what ``quantize --plan`` reads and what an artifact stores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from quantization.backend import LayerSpec

__all__ = ["LayerPlan", "plan_from_json", "plan_to_json", "specs_of"]


@dataclass(frozen=True)
class LayerPlan:
    weights: str
    activations: str | None
    group_size: int | None = None
    block: str | None = None
    smoothing_alpha: float | None = None
    time_sensitive: bool = False

    @property
    def spec(self) -> LayerSpec:
        return LayerSpec(self.weights, self.activations, self.group_size)


def plan_to_json(plan: dict[str, LayerPlan]) -> dict:
    out = {}
    for name, lp in sorted(plan.items()):
        entry = asdict(lp)
        entry["activations"] = lp.activations or "none"
        out[name] = entry
    return out


def plan_from_json(raw: dict) -> dict[str, LayerPlan]:
    """Read a plan, validating every entry (an unknown qtype or field is an error, not a guess)."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError("a plan is a non-empty JSON object keyed by layer name")
    plan = {}
    fields = set(LayerPlan.__dataclass_fields__)
    for name, entry in raw.items():
        if not isinstance(entry, dict) or "weights" not in entry:
            raise ValueError(f"plan entry {name!r} needs at least a 'weights' qtype")
        unknown = set(entry) - fields
        if unknown:
            raise ValueError(f"plan entry {name!r} has unknown fields {sorted(unknown)}")
        activations = entry.get("activations", "none")
        lp = LayerPlan(
            **{**entry, "activations": None if activations in (None, "none") else activations}
        )
        try:
            lp.spec  # noqa: B018 - validates the qtypes and group size
        except ValueError as e:
            raise ValueError(f"plan entry {name!r}: {e}") from None
        plan[name] = lp
    return plan


def specs_of(plan: dict[str, LayerPlan]) -> dict[str, LayerSpec]:
    return {name: lp.spec for name, lp in plan.items()}
