"""Every Redis key the service uses, in one place. All share the settings' ``key_prefix``."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GROUP", "Keys"]

GROUP = "workers"  # the consumer group of every job stream


@dataclass(frozen=True)
class Keys:
    prefix: str = "t2i"

    def stream(self, model: str, variant: str) -> str:
        """The job stream of one served (model, variant): its workers' consumer group reads it."""
        return f"{self.prefix}:stream:{model}:{variant}"

    def queued(self, model: str, variant: str) -> str:
        """Sorted set of the jobs not yet taken, by enqueue time: depth and positions."""
        return f"{self.prefix}:queued:{model}:{variant}"

    def workers(self, model: str, variant: str) -> str:
        """Sorted set of worker ids by their last heartbeat (unix seconds)."""
        return f"{self.prefix}:workers:{model}:{variant}"

    def resident(self, model: str, variant: str) -> str:
        """Hash: worker id -> JSON of what it holds of the variant loaded (its bytes); a
        worker that evicts the variant or leaves removes its field."""
        return f"{self.prefix}:resident:{model}:{variant}"

    def durations(self, model: str, variant: str) -> str:
        """List of the latest job durations in seconds, for Retry-After estimates."""
        return f"{self.prefix}:durations:{model}:{variant}"

    def job(self, job_id: str) -> str:
        """Hash: the job record."""
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        """Stream of the job's status and progress events (what SSE replays)."""
        return f"{self.prefix}:job:{job_id}:events"

    def done(self, job_id: str) -> str:
        """Stream with one entry once the job has finished: what synchronous waiters block on,
        so they wake once per job rather than at every step."""
        return f"{self.prefix}:job:{job_id}:done"

    def image(self, job_id: str, index: int) -> str:
        return f"{self.prefix}:job:{job_id}:image:{index}"

    def preview(self, job_id: str, index: int, image: int) -> str:
        """Preview ``index`` (0, 1, ...) of the job's image ``image``, encoded as the job asks."""
        return f"{self.prefix}:job:{job_id}:preview:{index}:{image}"

    def upload(self, sha256: str) -> str:
        """An edit's input image or mask (PNG), by the sha256 of its bytes: jobs name it."""
        return f"{self.prefix}:upload:{sha256}"

    def latents(self, job_id: str) -> str:
        """The final latents (float32, C-order) of all the job's images, for SQNR in compares."""
        return f"{self.prefix}:job:{job_id}:latents"

    def comparison(self, comparison_id: str) -> str:
        """String: a comparison's record (JSON), which names its jobs."""
        return f"{self.prefix}:comparison:{comparison_id}"

    def idempotency(self, owner: str, key: str) -> str:
        return f"{self.prefix}:idempotency:{owner}:{key}"

    def rate(self, owner: str, window: int) -> str:
        """Counter of an owner's accepted submissions in one minute window."""
        return f"{self.prefix}:rate:{owner}:{window}"

    def auth_failures(self, address: str, window: int) -> str:
        """Counter of failed authentications from one client address in one minute window."""
        return f"{self.prefix}:authfail:{address}:{window}"

    def wake(self, listener: str) -> str:
        """Stream that wakes one API process's event listener when it has new streams to read."""
        return f"{self.prefix}:listener:{listener}"

    def dead_letter(self) -> str:
        """Stream of jobs given up after too many deliveries."""
        return f"{self.prefix}:dead-letter"
