"""What a user asks beyond the recipe, resolved once (quantization.options)."""

import pytest

from quantization.calibration import Conditions
from quantization.options import QuantizeOptions, resolve


def test_smoothing_follows_the_recipe_unless_asked_and_only_where_it_is_planned():
    c = Conditions("classes", (0, 1), "--classes")

    def smoothing(recipe, given):
        o = QuantizeOptions(smoothing=given)
        return resolve(o, recipe, steps=4, guidance=2.0, conditions=c).smoothing

    assert smoothing("w4a8-sqnr", None) is True
    assert smoothing("w4a8-sqnr", False) is False
    assert smoothing("w8a8-static-sqnr", None) is False
    assert smoothing("w8a8-static-sqnr", True) is True
    with pytest.raises(ValueError, match="--smoothing: SmoothQuant is chosen per layer"):
        smoothing("w8a8-static", True)
