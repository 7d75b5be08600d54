"""The pure pieces of bench.load_test: reading a histogram out of a scrape, and its quantiles."""

import pytest

from bench.load_test import histogram, quantile

SCRAPE = """\
# TYPE t2i_http_request_duration_seconds histogram
t2i_http_request_duration_seconds_bucket{le="0.001",route="/v1/jobs"} 0.0
t2i_http_request_duration_seconds_bucket{le="0.01",route="/v1/jobs"} 60.0
t2i_http_request_duration_seconds_bucket{le="0.1",route="/v1/jobs"} 100.0
t2i_http_request_duration_seconds_bucket{le="+Inf",route="/v1/jobs"} 100.0
t2i_http_request_duration_seconds_bucket{le="0.01",route="/healthz"} 7.0
t2i_http_request_duration_seconds_bucket{le="+Inf",route="/healthz"} 7.0
"""


def test_histogram_reads_one_series_in_order():
    buckets = histogram(SCRAPE, "t2i_http_request_duration_seconds", {"route": "/v1/jobs"})
    assert buckets == [(0.001, 0.0), (0.01, 60.0), (0.1, 100.0), (float("inf"), 100.0)]


def test_quantile_interpolates_inside_the_bucket_of_what_was_observed_between_scrapes():
    after = histogram(SCRAPE, "t2i_http_request_duration_seconds", {"route": "/v1/jobs"})
    before = [(0.001, 0.0), (0.01, 20.0), (0.1, 20.0), (float("inf"), 20.0)]  # 80 new
    # 40 of the 80 new observations fell in (0.001, 0.01], 40 in (0.01, 0.1]
    assert quantile(before, after, 0.5) == pytest.approx(0.01)
    assert quantile(before, after, 0.25) == pytest.approx(0.001 + 0.009 * 0.5)
    assert quantile(before, after, 0.99) == pytest.approx(0.01 + 0.09 * (79.2 - 40) / 40)
    assert quantile(after, after, 0.5) is None  # nothing observed in between
