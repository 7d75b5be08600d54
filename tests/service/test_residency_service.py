"""One worker process hosting several variants (app.worker): under a budget that holds two of
three denoisers, requests over all three are answered, evicting as they go; a variant whose
artifact is corrupt and one whose load runs out of memory fail their own jobs with the reason
while the others answer, and the worker process stays up. Real Redis, a real worker process,
the official client."""

from __future__ import annotations

import resource
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.service.conftest import MODELS, WorkerProcess, make_settings, serving

DIT = ("dit-digits", "fp32"), ("dit-digits", "w8a8"), ("dit-digits", "w4a8-sqnr")
# denoisers: fp32 11,533,888 B, w8a8 5,697,088, w4a8-sqnr 5,170,688, and one VAE of 935,004
# shared: any two fit 19 MB (at most 18,166,0xx), all three (23,336,668) do not
BUDGET = "19MB"


def _registry(tmp_path, extra: str = "") -> str:
    path = tmp_path / f"registry-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(
        f"""
[models.dit-digits]
source = "{MODELS / "dit-digits"}"
sizes = ["32x32"]
[models.dit-digits.variants.fp32]
dtype = "fp32"
[models.dit-digits.variants.w8a8]
artifact = "{MODELS / "quantized" / "dit-digits-w8a8"}"
[models.dit-digits.variants.w4a8-sqnr]
artifact = "{MODELS / "quantized" / "dit-digits-w4a8-sqnr"}"
{extra}"""
    )
    return path


def _metric(scrape: str, name: str, variant: str) -> float:
    total = 0.0
    for line in scrape.splitlines():
        if line.startswith(name + "{") and f'variant="{variant}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_budget_of_two_denoisers_serves_three_variants_by_evicting(redis_url, tmp_path):
    settings = make_settings(redis_url, _registry(tmp_path), batch_max=4)
    port = _free_port()
    worker = WorkerProcess(settings, serves=list(DIT), memory_budget=BUDGET, metrics_port=port)
    with serving(settings, [worker]) as server, server.client() as http:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        models = http.get("/v1/models").json()["data"][0]["variants"]
        assert not any(v["resident"] for v in models)  # with a budget: at the first job

        def ask(i: int) -> str:
            variant = DIT[i % 3][1]
            result = client.images.generate(
                model="dit-digits",
                prompt="a seven",
                extra_body={"variant": variant, "steps": 2, "seed": i},
            )
            assert len(result.data) == 1 and result.data[0].b64_json
            return variant

        with ThreadPoolExecutor(6) as clients:
            answered = list(clients.map(ask, range(60)))
        assert sorted(answered) == sorted(DIT[i % 3][1] for i in range(60))
        scrape = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        evictions = sum(_metric(scrape, "t2i_variant_evictions_total", v) for _, v in DIT)
        assert evictions > 0
        variants = http.get("/v1/models").json()["data"][0]["variants"]
        resident = [v for v in variants if v["resident"]]
        assert len(resident) == 2 and all(v["resident_bytes"] > 0 for v in resident)
        [away] = [v["id"] for v in variants if not v["resident"]]
        asked = {"model": "dit-digits", "variant": away, "prompt": "a seven", "steps": 2}
        job = http.post("/v1/jobs", json=asked).json()
        assert _wait(http, job["id"])["status"] == "completed"
        events = http.get(f"/v1/jobs/{job['id']}/events").text  # ended: the whole stream
        kinds = [
            line.split(": ", 1)[1] for line in events.splitlines() if line.startswith("event:")
        ]
        assert "loading" in kinds and kinds.index("loading") < kinds.index("progress")
        assert worker.process.poll() is None


def test_variants_that_cannot_load_fail_their_jobs_and_the_others_serve(redis_url, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(MODELS / "quantized" / "dit-digits-w8a8", corrupt)
    weights = corrupt / "transformer" / "quantized.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    huge = tmp_path / "huge"
    _huge_pipeline(huge)
    extra = f"""
[models.dit-digits.variants.corrupt]
artifact = "{corrupt}"
[models.huge]
source = "{huge}"
sizes = ["32x32"]
[models.huge.variants.fp32]
dtype = "fp32"
"""
    settings = make_settings(redis_url, _registry(tmp_path, extra))
    served = [*DIT, ("dit-digits", "corrupt"), ("huge", "fp32")]
    # 4 GiB of budget: the huge model is not refused by the budget; it starts to load, and
    # runs out of memory (an address-space limit set once the worker is up leaves less room
    # than its 604 MB of weights need)
    worker = WorkerProcess(settings, serves=served, memory_budget="4GiB")  # nothing pinned
    with serving(settings, [worker]) as server, server.client() as http:
        size = _address_space(worker.process.pid)
        resource.prlimit(worker.process.pid, resource.RLIMIT_AS, (size + HEADROOM, -1))
        failures: list[str] = []
        stop = threading.Event()

        def keep_asking() -> None:
            i = 0
            while not stop.is_set():
                variant = DIT[i % 3][1]
                i += 1
                r = http.post(
                    "/v1/images/generations",
                    json={"model": "dit-digits", "variant": variant, "prompt": "a seven"}
                    | {"steps": 2},
                )
                if r.status_code != 200:
                    failures.append(f"{variant}: {r.status_code} {r.text}")

        background = threading.Thread(target=keep_asking)
        background.start()
        try:
            for model, variant, code, reason in (
                ("dit-digits", "corrupt", "load_failed", "modified or corrupted"),
                ("huge", "fp32", "out_of_memory", "out of memory"),
            ):
                asked = {"model": model, "variant": variant, "prompt": "a seven", "steps": 2}
                job = http.post("/v1/jobs", json=asked).json()
                done = _wait(http, job["id"])
                assert done["status"] == "failed", done
                assert done["error"]["code"] == code, done
                assert reason in done["error"]["message"], done
                r = http.post("/v1/images/generations", json=asked)  # the OpenAI shape
                assert r.status_code >= 500 and reason in r.json()["error"]["message"]
        finally:
            stop.set()
            background.join(60)
        assert failures == []
        assert worker.process.poll() is None


HEADROOM = 450 << 20  # bytes of address space left to the worker: the small models run in it


def _address_space(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def _wait(http: httpx.Client, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not end within {timeout} s")


def _huge_pipeline(folder) -> None:
    """dit-digits with a DiT 2,048 wide: about 604 MB of fp32 weights, more than the room the
    worker's address space is left."""
    import torch
    from diffusers import DiTTransformer2DModel

    shutil.copytree(MODELS / "dit-digits", folder)
    shutil.rmtree(folder / "transformer")
    config = DiTTransformer2DModel.load_config(MODELS / "dit-digits" / "transformer")
    config.update(num_attention_heads=16, attention_head_dim=128, num_layers=2)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = DiTTransformer2DModel.from_config(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder / "transformer")


def _free_port() -> int:
    from bench.stack import free_port

    return free_port()
