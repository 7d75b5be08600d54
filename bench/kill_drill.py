"""Kill drill: jobs submitted, a worker SIGKILLed twice and Redis frozen for 10 s while they
run; nothing may be lost.

    python -m bench.kill_drill [--jobs 50] [--steps 40] [--freeze-s 10]

Two workers, each hosting dit-digits' fp32 and w4a8-sqnr variants (as one worker process hosts
many), share the fp32 queue. While the jobs run, the worker holding a job is
SIGKILLed (then restarted, as `python -m app` or Kubernetes would), twice; later, with a job
running, redis-server is stopped with SIGSTOP for ``--freeze-s`` seconds, then continued. At the
end every job must be completed, and each job's image must equal the image of a direct pipeline
call with the same seed — so a job that ran twice cannot have finished with two different
results. Writes bench/results/kill-drill.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np

from bench.record import save
from bench.stack import Stack

RESULTS = Path(__file__).resolve().parent / "results"
MODEL, VARIANT = "dit-digits", "fp32"
HOSTED = [(MODEL, VARIANT), (MODEL, "w4a8-sqnr")]  # what each worker process serves


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kill_drill", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--freeze-s", type=float, default=10.0, help="Redis SIGSTOP (0: none)")
    parser.add_argument("--out", type=Path, default=RESULTS / "kill-drill.json")
    args = parser.parse_args(argv)

    stack = Stack(reclaim_idle_s=3, heartbeat_s=0.5, torch_threads=1, queue_max=args.jobs)
    t0 = time.monotonic()
    kills: list[dict] = []
    freezes: list[dict] = []
    try:
        for name in ("worker-a", "worker-b"):
            stack.start_worker(name, serves=HOSTED)
        http = httpx.Client(base_url=stack.url, timeout=30)
        ids = []
        for i in range(args.jobs):
            body = {"model": MODEL, "prompt": str(i % 10), "steps": args.steps, "seed": 1000 + i}
            response = http.post("/v1/jobs", json=body)
            response.raise_for_status()
            ids.append(response.json()["id"])
        kill_at = (args.jobs // 5, args.jobs // 2)  # completed jobs before each kill
        freeze_at = 3 * args.jobs // 4
        deadline = time.monotonic() + 900
        views: dict[str, dict] = {}
        while time.monotonic() < deadline:
            views = {j: http.get(f"/v1/jobs/{j}").json() for j in ids}
            done = sum(v["status"] in ("completed", "failed", "cancelled") for v in views.values())
            if done == len(ids):
                break
            if len(kills) < len(kill_at) and done >= kill_at[len(kills)]:
                running = [
                    v for v in views.values() if v["status"] == "in_progress" and v["worker"]
                ]
                if running:
                    victim = running[0]["worker"]
                    stack.kill_worker(victim)
                    kills.append(
                        {
                            "worker": victim,
                            "job": running[0]["id"],
                            "step": running[0]["step"],
                            "completed_before": done,
                        }
                    )
                    print(f"SIGKILL {victim} at step {running[0]['step']} of a job ({done} done)")
                    stack.start_worker(victim, serves=HOSTED, wait=False)
            if args.freeze_s and not freezes and done >= freeze_at:
                running = [v for v in views.values() if v["status"] == "in_progress"]
                if running:
                    print(f"SIGSTOP redis-server for {args.freeze_s:g} s ({done} done)")
                    os.kill(stack.redis_server.process.pid, signal.SIGSTOP)
                    time.sleep(args.freeze_s)
                    os.kill(stack.redis_server.process.pid, signal.SIGCONT)
                    freezes.append(
                        {
                            "seconds": args.freeze_s,
                            "job": running[0]["id"],
                            "step": running[0]["step"],
                            "completed_before": done,
                        }
                    )
            time.sleep(0.05)
        wall = time.monotonic() - t0
        statuses: dict[str, int] = {}
        for v in views.values():
            statuses[v["status"]] = statuses.get(v["status"], 0) + 1
        images = {
            j: http.get(f"/v1/jobs/{j}/images/0").content
            for j in ids
            if views[j]["status"] == "completed"
        }
    finally:
        stack.close()

    mismatches = _compare_with_direct(ids, images, args.steps)
    record = save(
        args.out,
        "python -m bench.kill_drill",
        jobs=args.jobs,
        steps=args.steps,
        statuses=statuses,
        lost=args.jobs - sum(statuses.values()),
        kills=kills,
        redis_freezes=freezes,
        redelivered_jobs=sum(v["deliveries"] > 1 for v in views.values()),
        images_differing_from_a_direct_run=mismatches,
        wall_seconds=round(wall, 1),
    )
    print(json.dumps(record, indent=2))


def _compare_with_direct(ids: list[str], images: dict[str, bytes], steps: int) -> int:
    """Jobs whose image's pixels differ from the same seed run straight through the
    pipeline."""
    import torch

    from app.config import get_settings
    from app.queue.records import JobRequest
    from app.registry import load_registry
    from app.worker import pipeline

    torch.set_num_threads(1)  # as the workers ran: the same kernels, the same bits
    spec = load_registry(get_settings().registry).get(MODEL)
    loaded = pipeline.load(spec, spec.variants[VARIANT], "cpu")
    differing = 0
    for i, job_id in enumerate(ids):
        request = JobRequest(
            model=MODEL,
            variant=VARIANT,
            prompt=str(i % 10),
            n=1,
            width=32,
            height=32,
            steps=steps,
            guidance_scale=spec.guidance,
            seed=1000 + i,
            class_id=spec.class_id(str(i % 10)),
        )
        expected = pipeline.run_batch(loaded, spec, [request], lambda *_: None)[0].images[0]
        got = images.get(job_id)
        differing += got is None or not np.array_equal(_pixels(got), _pixels(expected))
    return differing


def _pixels(png: bytes):
    """The image's pixels: its metadata names the sampler as the API resolved it ("dpm++-2m")
    where a direct call leaves it to the folder's (the class name), and only pixels matter."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


if __name__ == "__main__":
    main()
