"""Reading a Prometheus text scrape (prometheus_client's own parser): samples by metric name."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["samples"]


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample named ``name`` (a histogram's ``_bucket`` series, a
    counter's ``_total``, a gauge) in the scrape ``text``."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]
