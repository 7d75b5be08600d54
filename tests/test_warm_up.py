"""A compiled worker's warm-up leaves nothing for a job to compile: edits, previews, a batch
without guidance and larger batches run the code it compiled."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from app.config import DEFAULT_REGISTRY
from app.queue.records import JobRequest
from app.registry import load_registry
from app.sizes import parse_size
from app.worker import pipeline


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow  # compiles each denoiser at three batch shapes: about a minute each
@pytest.mark.parametrize("model", ["t2i-digits", "dit-digits"])
def test_after_a_compiled_warm_up_no_job_compiles(model):
    spec = load_registry(DEFAULT_REGISTRY).models[model]
    assert spec.edits and spec.guidance_range[0] <= 1.0
    variant = dataclasses.replace(spec.variants["fp32"], compile=True)
    spec = dataclasses.replace(spec, variants={**spec.variants, "fp32": variant})
    torch._dynamo.reset()
    try:
        loaded = pipeline.load(spec, variant, "cpu", metadata=False)
        pipeline.warm_up(loaded, spec, "fp32", compiled=True)
        warmed = _graphs()
        assert warmed >= 2  # batch 1 apart, then a dynamic batch

        size = parse_size(spec.sizes[0])
        width, height = size.width, size.height
        image = pipeline.encode_image(np.full((height, width, 3), 40, np.uint8), "png")
        mask = pipeline.encode_image(np.full((height, width, 3), 255, np.uint8), "png")
        base = {
            "model": spec.name,
            "variant": "fp32",
            "prompt": "a red seven on a black background" if model == "t2i-digits" else "seven",
            "class_id": next(iter(spec.labels.values()), None),
            "n": 1,
            "width": width,
            "height": height,
            "steps": 6,
            "guidance_scale": 4.0,
            "seed": 3,
        }
        jobs = {
            "edit": ({"image": "a", "strength": 0.7}, {"image": image}),
            "inpaint": (
                {"image": "a", "mask": "b", "strength": 1.0},
                {"image": image, "mask": mask},
            ),
            "previews": ({"partial_images": 2}, {}),
            "no guidance": ({"guidance_scale": 1.0}, {}),
            "three images": ({"n": 3}, {}),
            "edit of two without guidance": (
                {"n": 2, "guidance_scale": 1.0, "image": "a", "strength": 0.5},
                {"image": image},
            ),
        }
        if not spec.inpainting:  # a class-conditional DiT edits without a mask
            del jobs["inpaint"]
        for name, (fields, inputs) in jobs.items():
            request = JobRequest(**{**base, **fields})
            seen: list[int] = []
            outputs = pipeline.run_batch(
                loaded,
                spec,
                [request],
                lambda *_: None,
                on_preview=(lambda k, step, parts, seen=seen: seen.append(step))
                if request.partial_images
                else None,
                **inputs,
            )
            assert len(outputs[0].images) == request.n, name
            assert _graphs() == warmed, f"{name} compiled a new graph"
            if request.partial_images:
                assert len(seen) == 2
    finally:
        torch._dynamo.reset()
