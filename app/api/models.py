"""``GET /v1/models``: the registry's models and variants, with what each artifact measured."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import Owner, QueueDep, RegistryDep
from app.registry import CLASS_CONDITIONAL, TEXT_TO_IMAGE

__all__ = ["router"]

PROMPT_HELP = {
    CLASS_CONDITIONAL: "free text naming one of `classes` as whole words, any case: "
    "'a seven', 'the digit 7, please'; the longest label found wins ('golden retriever' "
    "over 'retriever'); a prompt naming no class, or two, is refused (400)",
    TEXT_TO_IMAGE: "free text",
}

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
async def list_models(registry: RegistryDep, queue: QueueDep, _: Owner) -> dict:
    data = []
    for spec in registry.models.values():
        variants = []
        for variant in spec.variants.values():
            summary = variant.summary()
            summary["workers"] = await queue.live_workers(spec.name, variant.name)
            depth, oldest = await queue.queued(spec.name, variant.name)
            summary["queue_depth"], summary["oldest_queued_s"] = depth, oldest
            variants.append(summary)
        data.append(
            {
                "id": spec.name,
                "object": "model",
                "owned_by": "local",
                "kind": spec.kind,
                "default_variant": spec.default_variant,
                "sizes": list(spec.sizes),
                "default_steps": spec.default_steps,
                "max_steps": spec.max_steps,
                "guidance_scale": spec.guidance,
                "guidance_range": list(spec.guidance_range),
                "classes": sorted(set(spec.labels)) if spec.labels else None,
                "prompt_help": PROMPT_HELP[spec.kind],
                "variants": variants,
            }
        )
    return {"object": "list", "data": data}
