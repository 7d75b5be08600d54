"""One prompt and seed through several variants of a model, with fidelity against a reference.

Used by ``POST /v1/compare`` and by the shadow comparisons the API runs in the background when
``T2I_SHADOW_COMPARE_S`` is set. Each variant runs as an ordinary job on its own workers;
fidelity is PSNR and SSIM of the images and SQNR of the final latents against the reference
(full-precision) variant. The fidelity gauges follow the latest comparison.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from app import metrics
from app.config import Settings
from app.errors import InvalidRequest
from app.queue.client import JobQueue
from app.queue.records import ANONYMOUS, TERMINAL, Job, JobStatus
from app.registry import ModelSpec, Registry
from app.resolve import model_spec, variant_name
from app.schemas import CompareRequest
from app.submission import submit_variants
from app.uploads import decode_base64
from quality.metrics import psnr_db, sqnr_db, ssim

__all__ = ["Comparison", "Row", "collect", "compare", "shadow_loop", "start"]

log = logging.getLogger(__name__)

_FIDELITY = ("psnr_db", "ssim", "sqnr_latent_db")


@dataclass
class Row:
    variant: str
    quantized: bool
    job_id: str
    job: Job | None  # None: unknown or expired
    png: bytes | None = None
    psnr_db: float | None = None
    ssim: float | None = None
    sqnr_latent_db: float | None = None


@dataclass
class Comparison:
    id: str
    model: str
    prompt: str
    seed: int
    reference: str
    rows: list[Row] = field(default_factory=list)
    scored: bool = False  # fidelity measured (once, when the last job finished)
    owner: str = ANONYMOUS

    @property
    def finished(self) -> bool:
        return all(r.job is not None and r.job.status in TERMINAL for r in self.rows)

    def record(self) -> dict:
        """What is stored in Redis to find the comparison again."""
        return {
            "id": self.id,
            "model": self.model,
            "prompt": self.prompt,
            "seed": self.seed,
            "reference": self.reference,
            "scored": self.scored,
            "owner": self.owner,
            "rows": [
                {
                    "variant": r.variant,
                    "quantized": r.quantized,
                    "job_id": r.job_id,
                    **{k: getattr(r, k) for k in _FIDELITY},
                }
                for r in self.rows
            ],
        }

    @classmethod
    def from_record(cls, record: dict) -> Comparison:
        rows = [
            Row(r["variant"], r["quantized"], r["job_id"], None, **{k: r.get(k) for k in _FIDELITY})
            for r in record["rows"]
        ]
        return cls(
            record["id"],
            record["model"],
            record["prompt"],
            record["seed"],
            record["reference"],
            rows,
            record.get("scored", False),
            record.get("owner", ANONYMOUS),
        )


def check_variants(
    settings: Settings, spec: ModelSpec, names: list[str] | None, reference: str | None
) -> tuple[list[str], str]:
    """The variants to run and the reference among them; 4xx naming the parameter otherwise."""
    names = names or list(spec.variants)
    for name in names:
        variant_name(spec, name)
    if len(set(names)) != len(names):
        raise InvalidRequest("variants are listed twice", param="variants")
    if len(names) > settings.compare_max_variants:
        raise InvalidRequest(
            f"at most {settings.compare_max_variants} variants per compare", param="variants"
        )
    reference = reference or next((v for v in names if not spec.variants[v].quantized), names[0])
    if reference not in names:
        raise InvalidRequest(
            f"the reference {reference!r} is not among variants", param="reference"
        )
    return names, reference


async def start(
    settings: Settings, registry: Registry, queue: JobQueue, body: CompareRequest, owner: str
) -> Comparison:
    """Queue one job per variant (same prompt, seed and settings; an edit when ``body.image``
    is given), all or none, and store the comparison."""
    spec = model_spec(registry, body.model)
    image = None if body.image is None else decode_base64(body.image, "image")
    mask = None if body.mask is None else decode_base64(body.mask, "mask")
    names, reference = check_variants(settings, spec, body.variants, body.reference)
    seed = secrets.randbelow(2**31) if body.seed is None else body.seed
    submitted = await submit_variants(
        settings, registry, queue, body, names, seed, owner=owner, image=image, mask=mask
    )
    result = Comparison(
        uuid.uuid4().hex,
        spec.name,
        body.prompt,
        seed,
        reference,
        [
            Row(n, spec.variants[n].quantized, s.id, None)
            for n, s in zip(names, submitted, strict=True)
        ],
        owner=owner,
    )
    await queue.store_comparison(result.id, result.record())
    return result


async def collect(queue: JobQueue, comparison: Comparison, wait_s: float) -> Comparison:
    """The comparison with its jobs as far as they have come, waiting up to ``wait_s`` for them
    to finish. When the last one has, the fidelity of each variant against the reference is
    measured, stored with the comparison and set on the gauges — once, so reading an older
    comparison again does not move the gauges back."""
    waited: Sequence[Job | None] = [None] * len(comparison.rows)
    if wait_s > 0:
        waited = await asyncio.gather(*(queue.wait(r.job_id, wait_s) for r in comparison.rows))
    for row, job in zip(comparison.rows, waited, strict=True):
        row.job = job or await queue.get(row.job_id)  # None: still running, or gone
        if row.job is not None and row.job.status == JobStatus.COMPLETED and row.job.images:
            row.png = await queue.image(row.job_id, 0)
    if comparison.finished and not comparison.scored:
        await _score(queue, comparison)
        comparison.scored = True
        await queue.store_comparison(comparison.id, comparison.record())
    return comparison


async def _score(queue: JobQueue, comparison: Comparison) -> None:
    ref = next(r for r in comparison.rows if r.variant == comparison.reference)
    if ref.png is None:
        return
    ref_image = _pixels(ref.png)
    ref_latents = await _latents(queue, ref)
    for row in comparison.rows:
        if row.variant == comparison.reference or row.png is None:
            continue
        image = _pixels(row.png)
        row.psnr_db = _finite(psnr_db(ref_image[None], image[None]))
        row.ssim = _finite(ssim(ref_image[None], image[None]))
        latents = await _latents(queue, row)
        if latents is not None and ref_latents is not None and latents.shape == ref_latents.shape:
            row.sqnr_latent_db = _finite(sqnr_db(ref_latents, latents))
        labels = {"model": comparison.model, "variant": row.variant}
        for gauge, value in (
            (metrics.FIDELITY_PSNR, row.psnr_db),
            (metrics.FIDELITY_SSIM, row.ssim),
            (metrics.FIDELITY_SQNR, row.sqnr_latent_db),
        ):
            if value is not None:
                gauge.labels(**labels).set(value)


async def _latents(queue: JobQueue, row: Row) -> np.ndarray | None:
    blob = await queue.latents(row.job_id)
    return np.frombuffer(blob, np.float32) if blob else None


async def compare(
    settings: Settings, registry: Registry, queue: JobQueue, body: CompareRequest, owner: str
) -> Comparison:
    """Start and wait (at most the generation timeout) for the result."""
    comparison = await start(settings, registry, queue, body, owner)
    return await collect(queue, comparison, settings.generation_timeout_s)


async def shadow_loop(settings: Settings, registry: Registry, queue: JobQueue) -> None:
    """Every ``shadow_compare_s``, compare the variants of each model that has a
    ``shadow_prompt``, with a fresh seed, so the fidelity gauges follow live traffic's models.
    Only variants with a live worker take part: a shadow job must not wake a variant that has
    scaled to zero (and would wait for it)."""
    while True:
        await asyncio.sleep(settings.shadow_compare_s)
        for spec in registry.models.values():
            if not spec.shadow_prompt or len(spec.variants) < 2:
                continue
            try:
                live = [v for v in spec.variants if await queue.live_workers(spec.name, v) > 0]
                if len(live) < 2 or all(spec.variants[v].quantized for v in live):
                    continue  # nothing to compare against full precision now
                body = CompareRequest(model=spec.name, prompt=spec.shadow_prompt, variants=live)
                await compare(settings, registry, queue, body, owner="shadow")
            except Exception as exc:  # a failed shadow run must not stop the next
                log.warning("shadow compare of %s failed: %s", spec.name, exc)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _finite(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None
