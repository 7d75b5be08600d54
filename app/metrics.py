"""Every Prometheus metric of the service, declared once. docs/metrics.md has the table.

Names carry the ``t2i_`` prefix and base units; labels are model, variant, route, method,
status or kind, never a prompt or a user. The API process exports the request, queue and
fidelity metrics at ``/metrics``; each worker exports the generation metrics on its own port.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BATCH_SIZE",
    "DENOISER_WEIGHT_BYTES",
    "EVICTIONS",
    "FIDELITY_PSNR",
    "FIDELITY_SQNR",
    "FIDELITY_SSIM",
    "GENERATION_SECONDS",
    "IMAGES",
    "JOBS",
    "LOADS",
    "LOAD_FAILURES",
    "LOAD_SECONDS",
    "MODEL_LOAD_SECONDS",
    "MODEL_WARMUP_SECONDS",
    "PEAK_MEMORY_BYTES",
    "QUEUE_DEPTH",
    "QUEUE_OLDEST_SECONDS",
    "QUEUE_WAIT_SECONDS",
    "REQUESTS",
    "REQUEST_SECONDS",
    "RESIDENT_BYTES",
    "STEP_SECONDS",
    "WORKERS_LIVE",
]

_HTTP_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
MV = ("model", "variant")

# API process.
REQUESTS = Counter(
    "t2i_http_requests_total",
    "HTTP requests by route template, method and status",
    ("route", "method", "status"),
)
REQUEST_SECONDS = Histogram(
    "t2i_http_request_duration_seconds",
    "HTTP request duration by route template",
    ("route",),
    buckets=_HTTP_BUCKETS,
)
QUEUE_DEPTH = Gauge("t2i_queue_depth", "Jobs waiting in the queue (read at scrape)", MV)
QUEUE_OLDEST_SECONDS = Gauge(
    "t2i_queue_oldest_seconds",
    "How long the longest-waiting queued job has waited, 0 when none (read at scrape)",
    MV,
)
WORKERS_LIVE = Gauge("t2i_workers_live", "Workers with a fresh heartbeat (read at scrape)", MV)
FIDELITY_PSNR = Gauge("t2i_fidelity_psnr_db", "PSNR of the latest compare against FP, dB", MV)
FIDELITY_SSIM = Gauge("t2i_fidelity_ssim", "SSIM of the latest compare against FP", MV)
FIDELITY_SQNR = Gauge(
    "t2i_fidelity_sqnr_db", "SQNR of final latents in the latest compare against FP, dB", MV
)

# Both: jobs end in the worker (completed, failed, cancelled while running) or in the API
# (cancelled while queued).
JOBS = Counter("t2i_jobs_total", "Jobs by final status", (*MV, "status"))

# Worker processes.
GENERATION_SECONDS = Histogram(
    "t2i_generation_seconds",
    "Inference time of one job (pipeline call, encoding included)",
    MV,
    buckets=_LATENCY_BUCKETS,
)
STEP_SECONDS = Histogram(
    "t2i_step_seconds", "Time of one denoising step", MV, buckets=_STEP_BUCKETS
)
QUEUE_WAIT_SECONDS = Histogram(
    "t2i_queue_wait_seconds",
    "Time from submission to the start of inference",
    MV,
    buckets=_LATENCY_BUCKETS,
)
IMAGES = Counter("t2i_images_total", "Images generated", MV)
BATCH_SIZE = Histogram(
    "t2i_batch_jobs", "Jobs run together in one pipeline call", MV, buckets=(1, 2, 4, 8, 16)
)
PEAK_MEMORY_BYTES = Gauge(
    "t2i_peak_memory_bytes",
    "Peak memory of the latest job (kind: rss on CPU, cuda on GPU)",
    (*MV, "kind"),
)
DENOISER_WEIGHT_BYTES = Gauge(
    "t2i_denoiser_weight_bytes", "Bytes of the loaded denoiser's weights", MV
)
MODEL_LOAD_SECONDS = Gauge(
    "t2i_model_load_seconds", "Seconds the worker took to load its model", MV
)
VARIANT_INFO = Gauge(
    "t2i_variant_info",
    "What a live worker's variant runs (always 1): its backend (float for full precision), its "
    "recipe (its dtype for full precision) and whether its denoiser is compiled",
    (*MV, "backend", "recipe", "compiled"),
)
MODEL_WARMUP_SECONDS = Gauge(
    "t2i_model_warmup_seconds",
    "Seconds the worker's warm-up took before its first job (compiling, for compiled variants)",
    MV,
)

# Residency: the variants a worker hosts load at their first job and are evicted beyond its
# memory budget (app.worker.residency).
RESIDENT_BYTES = Gauge(
    "t2i_resident_bytes",
    "Bytes of weights a worker holds, per component (variant empty: shared by the model's "
    "variants, e.g. its text encoder and VAE; 0 once evicted)",
    (*MV, "component"),
)
LOADS = Counter("t2i_variant_loads_total", "Variants loaded by a worker", MV)
LOAD_SECONDS = Histogram(
    "t2i_variant_load_seconds",
    "Seconds a variant took to load (warm-up included)",
    MV,
    buckets=_LATENCY_BUCKETS,
)
EVICTIONS = Counter(
    "t2i_variant_evictions_total", "Variants evicted to keep a worker within its budget", MV
)
LOAD_FAILURES = Counter(
    "t2i_variant_load_failures_total",
    "Loads that failed (reason: load_failed, out_of_memory, over_budget)",
    (*MV, "reason"),
)
