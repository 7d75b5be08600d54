"""Load a pipeline folder (ours or a real checkpoint) offline; restore what diffusers omits."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = [
    "DEFAULTS_FILE",
    "ID2LABEL_FILE",
    "compile_denoiser",
    "load_pipeline",
    "read_defaults",
    "sampling_settings",
    "save_pipeline",
]

DEFAULTS_FILE = "defaults.json"
ID2LABEL_FILE = "id2label.json"


def read_defaults(source: str | Path) -> dict:
    """The inference defaults a model folder states (steps, guidance, size); {} when none."""
    path = Path(source) / DEFAULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def sampling_settings(
    source: str | Path, steps: int | None = None, guidance: float | None = None, pipe=None
) -> tuple[int, float]:
    """Steps and guidance: those given, else the folder's ``defaults.json``, else the defaults
    of ``pipe``'s own ``__call__`` (DiT: 250 steps, 4.0; Stable Diffusion: 50, 7.5); an error
    if none states them."""
    import inspect

    defaults = read_defaults(source) if Path(source).is_dir() else {}
    if pipe is not None:
        params = inspect.signature(type(pipe).__call__).parameters
        for key in ("num_inference_steps", "guidance_scale"):
            default = params[key].default if key in params else inspect.Parameter.empty
            if key not in defaults and isinstance(default, int | float):
                defaults[key] = default
    steps = steps or defaults.get("num_inference_steps")
    guidance = guidance if guidance is not None else defaults.get("guidance_scale")
    if steps is None or guidance is None:
        raise ValueError(
            f"{source} states no default steps / guidance: pass --steps and --guidance"
        )
    return int(steps), float(guidance)


def load_pipeline(
    source: str | Path, *, torch_dtype=None, local_files_only: bool = True, **components
):
    """``DiffusionPipeline.from_pretrained`` plus the DiT class labels kept in ``id2label.json``.

    ``components`` replace the folder's own (e.g. ``transformer=`` a quantized denoiser).
    """
    import torch
    from diffusers import DiffusionPipeline, DiTPipeline

    kwargs = {
        "torch_dtype": torch_dtype or torch.float32,
        "local_files_only": local_files_only,
        **components,
    }
    labels_file = Path(source) / ID2LABEL_FILE
    if labels_file.is_file():
        id2label = {int(k): v for k, v in json.loads(labels_file.read_text()).items()}
        return DiTPipeline.from_pretrained(source, id2label=id2label, **kwargs)
    return DiffusionPipeline.from_pretrained(source, **kwargs)


def compile_denoiser(pipe) -> None:
    """Swap the pipeline's denoiser (``transformer`` or ``unet``) for its ``torch.compile``d
    self. Compiling happens at its first calls, once per shape (then a dynamic batch); the
    int8 kernels of the x86 backend stay one extern call each, with the quantizing of their
    inputs and the scaling of their outputs fused around them. ``TORCHINDUCTOR_CACHE_DIR``,
    where set, keeps the generated code for the next process. Idempotent.

    The compiled code is specialised on its inputs' strides, and an edit's latents come from
    the VAE in channels-last strides (the image is permuted from HWC): a hook outside the
    compiled code makes every tensor argument contiguous, so an edit runs the code that a
    generation compiled instead of compiling its own."""
    import torch

    attr = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    denoiser = getattr(pipe, attr)
    if isinstance(denoiser, torch._dynamo.eval_frame.OptimizedModule):
        return  # compiled already: compiling it again would wrap it in a plain function
    compiled = torch.compile(denoiser)
    compiled.register_forward_pre_hook(_contiguous, with_kwargs=True)
    setattr(pipe, attr, compiled)


def _contiguous(module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    import torch

    def fix(v):
        return v.contiguous() if isinstance(v, torch.Tensor) else v

    return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}


def save_pipeline(pipe, folder: str | Path) -> None:
    """``save_pretrained`` (safetensors) plus ``id2label.json`` for a DiT pipeline with labels."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    labels = getattr(pipe, "labels", None)
    if labels:
        names: dict[int, list[str]] = {}
        for name, class_id in labels.items():
            names.setdefault(int(class_id), []).append(name)
        id2label = {str(k): ", ".join(v) for k, v in sorted(names.items())}
        (folder / ID2LABEL_FILE).write_text(json.dumps(id2label, indent=2) + "\n")
