"""What every backend's ``load_state`` shares: a saved state must name exactly the tensors the
prepared model holds (a lenient load would keep random weights without a word)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["check_keys"]


def check_keys(expected: Iterable[str], given: Iterable[str]) -> None:
    """Raise KeyError naming the missing and unexpected keys, if there are any."""
    expected, given = set(expected), set(given)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise KeyError(
            f"state dict does not match the plan: {len(missing)} missing {missing[:5]}, "
            f"{len(unexpected)} unexpected {unexpected[:5]}"
        )
