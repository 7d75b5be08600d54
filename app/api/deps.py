"""What the routes share: settings, registry and queue from app.state; who calls; ``Views``,
which builds every response body; and what the two event streams need to notice a job gone."""

from __future__ import annotations

import base64
import logging
import time
from typing import Annotated

from fastapi import Depends, Request
from redis.exceptions import RedisError

from app.comparison import Comparison
from app.config import Settings
from app.provenance import read_parameters
from app.queue.client import JobQueue
from app.queue.records import Job
from app.registry import Registry
from app.schemas import (
    CompareResponse,
    CompareVariant,
    ImageData,
    ImagesResponse,
    JobCreated,
    JobView,
)

__all__ = [
    "KEEPALIVE_S",
    "Owner",
    "QueueDep",
    "RegistryDep",
    "SettingsDep",
    "Views",
    "ViewsDep",
    "job_gone",
]

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0  # an SSE comment at least this often keeps proxies and clients from timing out


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _queue(request: Request) -> JobQueue:
    return request.app.state.queue


def _owner(request: Request) -> str:
    """Who calls, as ``app.api.middleware.Guard`` authenticated it (every /v1/ route)."""
    return request.state.owner


class Views:
    """Response bodies from job and comparison records, with the URLs of the routes: under
    ``T2I_PUBLIC_URL`` when set, else paths; never from ``Host``."""

    def __init__(self, request: Request, settings: Settings) -> None:
        self.request, self.settings = request, settings

    def url(self, name: str, **params) -> str:
        path = self.request.app.url_path_for(name, **params)
        return f"{self.settings.public_url}{path}" if self.settings.public_url else str(path)

    def image_url(self, job_id: str, index: int) -> str:
        return self.url("job_image", job_id=job_id, index=index)

    def preview_url(self, job_id: str, index: int) -> str:
        return self.url("job_preview", job_id=job_id, index=index)

    def created(self, job: Job, position: int) -> JobCreated:
        return JobCreated(
            id=job.id,
            status=job.status.value,
            position=position,
            model=job.request.model,
            variant=job.request.variant,
        )

    def job(self, job: Job, position: int) -> JobView:
        error = {"message": job.error, "code": job.error_code} if job.error else None
        return JobView(
            id=job.id,
            status=job.status.value,
            progress=job.progress,
            step=job.step,
            steps=job.request.steps_run,
            position=position,
            model=job.request.model,
            variant=job.request.variant,
            seed=job.request.seed,
            created=job.created_at,
            timings=job.timings,
            deliveries=job.deliveries,
            worker=job.worker,
            cancel_requested=job.cancel_requested,
            error=error,
            images=[self.image_url(job.id, k) for k in range(job.images)],
            previews=[self.preview_url(job.id, k) for k in range(job.previews)],
            result=job.result,
        )

    def images(self, job: Job, data: list[ImageData]) -> ImagesResponse:
        r = job.request
        return ImagesResponse(
            created=int(job.finished_at or time.time()),
            data=data,
            id=job.id,
            model=r.model,
            variant=r.variant,
            seed=r.seed,
            steps=r.steps,
            guidance_scale=r.guidance_scale,
            negative_prompt=r.negative_prompt,
            scheduler=r.scheduler,
            strength=r.strength,
            output_format=r.output_format,
            timings={**job.timings, **{k: job.result.get(k) for k in ("step_ms_median",)}},
        )

    def comparison(self, result: Comparison) -> CompareResponse:
        rows = []
        for row in result.rows:
            job = row.job
            measured = job.result if job else {}
            rows.append(
                CompareVariant(
                    variant=row.variant,
                    quantized=row.quantized,
                    job_id=row.job_id,
                    status=job.status.value if job else "expired",
                    progress=job.progress if job else 0,
                    b64_png=base64.b64encode(row.png).decode() if row.png else None,
                    url=self.image_url(row.job_id, 0) if row.png else None,
                    latency_s=job.timings["total_s"] if job else None,
                    inference_s=measured.get("inference_s"),
                    step_ms_median=measured.get("step_ms_median"),
                    peak_memory_bytes=measured.get("peak_memory_bytes"),
                    denoiser_weight_bytes=measured.get("denoiser_weight_bytes"),
                    psnr_db=row.psnr_db,
                    ssim=row.ssim,
                    sqnr_latent_db=row.sqnr_latent_db,
                    error=job.error if job else "the job has expired",
                    parameters=read_parameters(row.png) if row.png else None,
                    previews=[self.preview_url(row.job_id, k) for k in range(job.previews)]
                    if job
                    else [],
                )
            )
        return CompareResponse(
            id=result.id,
            status="completed" if result.finished else "in_progress",
            model=result.model,
            prompt=result.prompt,
            seed=result.seed,
            reference=result.reference,
            variants=rows,
        )


def _views(request: Request) -> Views:
    return Views(request, _settings(request))


SettingsDep = Annotated[Settings, Depends(_settings)]
RegistryDep = Annotated[Registry, Depends(_registry)]
QueueDep = Annotated[JobQueue, Depends(_queue)]
Owner = Annotated[str, Depends(_owner)]
ViewsDep = Annotated[Views, Depends(_views)]


async def job_gone(queue: JobQueue, job_id: str) -> bool:
    """The job's record has expired (a stalled Redis does not end the stream)."""
    try:
        return await queue.get(job_id) is None
    except RedisError as exc:
        log.warning("cannot read job %s while streaming: %s", job_id, exc)
        return False
