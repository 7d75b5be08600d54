"""Job records as they live in Redis hashes: a status enum, the request, and the read-back view."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from pipelines.schedulers import steps_run

__all__ = [
    "ANONYMOUS",
    "TERMINAL",
    "Job",
    "JobRequest",
    "JobStatus",
    "decode",
    "encode_new",
    "is_id",
]

_ID = re.compile(r"[0-9a-f]{32}")
ANONYMOUS = "anonymous"  # the owner of everything when the service has no API keys


def is_id(value: str) -> bool:
    """The one format of job and comparison ids (``uuid4().hex``), checked before any Redis
    call, so a crafted id never reaches a key it was not meant for."""
    return _ID.fullmatch(value) is not None


class JobStatus(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class JobRequest:
    """What a worker needs to run a job; validated by the API before it is queued."""

    model: str
    variant: str
    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    output_format: str = "png"
    negative_prompt: str | None = None
    output_compression: int | None = None  # jpeg / webp encoder quality; None: its default
    class_id: int | None = None  # class-conditional models: the class the prompt names
    scheduler: str | None = None  # a name of pipelines.schedulers; None: the folder's own
    partial_images: int = 0  # previews made while it runs (evenly spaced steps)
    # Edits: the sha256 of the input image (and of the mask, white = paint anew) as uploaded
    # (Keys.upload), and SDEdit's strength.
    image: str | None = None
    mask: str | None = None
    strength: float | None = None
    # LoRA adapters of the model's registry entry, each (name, scale), applied in this order
    lora: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:  # read back from JSON, the pairs are lists
        object.__setattr__(self, "lora", tuple((str(n), float(s)) for n, s in self.lora))

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call."""
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.negative_prompt,
            self.scheduler,
            self.partial_images,
            self.image,
            self.mask,
            self.strength,
            self.lora,
        )

    @property
    def steps_run(self) -> int:
        """The denoising steps that run: ``steps``, or an edit's share of them."""
        return steps_run(self.steps, self.strength)


@dataclass
class Job:
    """A job record read back from Redis."""

    id: str
    status: JobStatus
    request: JobRequest
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: int = 0
    step: int = 0
    error: str | None = None
    error_code: str | None = None
    deliveries: int = 0
    worker: str | None = None
    images: int = 0
    previews: int = 0  # previews stored so far (Keys.preview)
    cancel_requested: bool = False
    owner: str = ANONYMOUS  # a hash of the API key that made it (app.api.auth), never the key
    result: dict = field(default_factory=dict)  # the worker's measurements

    @property
    def timings(self) -> dict:
        """Queue wait, inference and total seconds, as far as the job has come."""
        out: dict[str, float | None] = {"queue_wait_s": None, "inference_s": None, "total_s": None}
        if self.started_at is not None:
            out["queue_wait_s"] = round(self.started_at - self.created_at, 4)
        if self.finished_at is not None:
            out["total_s"] = round(self.finished_at - self.created_at, 4)
            if self.started_at is not None:
                out["inference_s"] = round(self.finished_at - self.started_at, 4)
        return out


def encode_new(
    job_id: str, request: JobRequest, now: float, owner: str = ANONYMOUS
) -> dict[str, str]:
    """The hash fields of a freshly queued job."""
    return {
        "id": job_id,
        "owner": owner,
        "status": JobStatus.QUEUED.value,
        "request": json.dumps(asdict(request)),
        "created_at": repr(now),
        "progress": "0",
        "step": "0",
        "deliveries": "0",
    }


def decode(fields: dict) -> Job:
    """A Job from HGETALL (bytes or str keys and values)."""
    f = {_s(k): _s(v) for k, v in fields.items()}

    def opt_float(name: str) -> float | None:
        return float(f[name]) if f.get(name) else None

    return Job(
        id=f["id"],
        status=JobStatus(f["status"]),
        request=JobRequest(**json.loads(f["request"])),
        created_at=float(f["created_at"]),
        started_at=opt_float("started_at"),
        finished_at=opt_float("finished_at"),
        progress=int(f.get("progress", 0)),
        step=int(f.get("step", 0)),
        error=f.get("error") or None,
        error_code=f.get("error_code") or None,
        deliveries=int(f.get("deliveries", 0)),
        worker=f.get("worker") or None,
        images=int(f.get("images", 0)),
        previews=int(f.get("previews", 0)),
        cancel_requested=f.get("cancel_requested") == "1",
        owner=f.get("owner") or ANONYMOUS,
        result=json.loads(f["result"]) if f.get("result") else {},
    )


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
