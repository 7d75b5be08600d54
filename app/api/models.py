"""``GET /v1/models``: the registry's models and variants, with what each artifact measured."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import Owner, QueueDep, RegistryDep
from app.queue.records import CONTENT_TYPES
from app.registry import CLASS_CONDITIONAL, TEXT_TO_IMAGE, ModelSpec
from app.resolve import MAX_PARTIAL_IMAGES, QUALITY_STEPS, steps_for
from app.schemas import AdapterInfo, ModelCapabilities, ModelInfo, ModelList, VariantInfo

__all__ = ["router"]

PROMPT_HELP = {
    CLASS_CONDITIONAL: "free text naming one of `classes` as whole words, any case: "
    "'a seven', 'the digit 7, please'; the longest label found wins ('golden retriever' "
    "over 'retriever'); a prompt naming no class, or two, is refused (400)",
    TEXT_TO_IMAGE: "free text",
}

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
async def list_models(registry: RegistryDep, queue: QueueDep, _: Owner) -> ModelList:
    data = []
    for spec in registry.models.values():
        variants = []
        for variant in spec.variants.values():
            summary = variant.summary()
            summary["workers"] = await queue.live_workers(spec.name, variant.name)
            holders, nbytes = await queue.resident(spec.name, variant.name)
            summary["resident"], summary["resident_bytes"] = holders > 0, nbytes
            depth, oldest = await queue.queued(spec.name, variant.name)
            summary["queue_depth"], summary["oldest_queued_s"] = depth, oldest
            variants.append(VariantInfo(**summary))
        data.append(
            ModelInfo(
                id=spec.name,
                kind=spec.kind,
                default_variant=spec.default_variant,
                sizes=list(spec.sizes),
                default_steps=spec.default_steps,
                max_steps=spec.max_steps,
                guidance_scale=spec.guidance,
                guidance_range=spec.guidance_range,
                classes=sorted(set(spec.labels)) if spec.labels else None,
                prompt_help=PROMPT_HELP[spec.kind],
                capabilities=capabilities(spec),
                variants=variants,
                adapters=[AdapterInfo(**a.summary()) for a in spec.adapters.values()],
                max_lora=spec.max_lora,
            )
        )
    return ModelList(data=data)


def capabilities(spec: ModelSpec) -> ModelCapabilities:
    return ModelCapabilities(
        sizes=list(spec.sizes),
        steps=(1, spec.max_steps),
        default_steps=spec.default_steps,
        quality_steps={q: steps_for(spec, q) for q in QUALITY_STEPS},
        guidance_range=spec.guidance_range,
        schedulers=spec.schedulers,
        default_scheduler=spec.scheduler,
        negative_prompt=spec.kind == TEXT_TO_IMAGE,
        output_formats=list(CONTENT_TYPES),
        edits=spec.edits,
        inpainting=spec.inpainting,
        previews=spec.previews,
        max_partial_images=MAX_PARTIAL_IMAGES,
    )
