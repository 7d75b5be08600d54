"""Resident bytes of a model's fp32, w8a8 and w4 variants at real size: hosted by one worker
process that shares their text encoders, tokenizers and VAE, against one process each.

    python -m bench.shared_memory --arch sd15 --arch flux-small --out bench/results
    python -m bench.shared_memory --markdown bench/results/shared-memory-sd15.json

Per architecture: a random-weight pipeline in its real configuration is saved to a folder
(under ``--work``, several GB), its denoiser quantized into a w8a8 artifact (``w8a8-static``:
int8 weights per output channel, one calibrated int8 activation scale per layer, on one
calibration prompt; no SQNR planner) and a w4 artifact (``w4a16-g128``: int4 weights in
groups of 128, float activations, no calibration), neither sampling check images, by
``python -m quantization quantize`` (flux-small: by ``quantization.quantize``, the function
it calls, at 256 px: ``quantize_at``). A registry TOML names the three variants. Folders and
artifacts already in the work folder are reused, so a rerun costs the measurements only.

Then, each in a fresh process, the way a worker loads them (``app.worker.pipeline.load``, CPU,
no compile): shared, the three variants one after another into one ``Components``; separate,
each variant alone in its own process. After each load: the bytes ``Components`` holds per
component identity (and the same tensors counted once), the process's resident set once every
held weight has been read (VmRSS, anonymous and file-backed, as loaded, and its high-water
mark VmHWM), and the bytes ``estimate_bytes_needed`` predicted before the load; after the last
load, VmRSS once ``malloc_trim(0)`` has returned the heap's free memory. The separate total
is the sum over the three processes. Writes ``shared-memory-<arch>.json`` and ``.md``.

sd15: bench.quantize_cost's Stable Diffusion 1.5 (the UNet of bench.full_size, 860M
parameters; CLIP ViT-L/14's text tower; the SD VAE; the t2i-digits tokenizer padded to 77).
flux-small: Flux.1-dev's configuration at real width with fewer layers: the transformer with
2 of its 19 double-stream and 4 of its 38 single-stream blocks (width 3072, 24 heads, guidance
embedding), T5-XXL's encoder with 2 of its 24 layers (width 4096, 64 heads, gated-GELU FFN
10240, vocabulary 32128), CLIP ViT-L/14's text tower and the Flux VAE (16 latent channels).
Random weights say nothing of image quality; these are bytes and seconds only.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.quantize_cost import PROMPTS, ROOT, machine_info, run_logged
from bench.record import save

__all__ = ["ARCHS", "VARIANTS", "Load", "Process", "Report"]

RESULTS = ROOT / "bench" / "results"
WORK = Path("/tmp/t2i-shared-memory")
MODEL = "bench"  # the registry's model name
# variant -> the quantize recipe and its options, QuantizeOptions' names and the CLI's flags
# (None: the float pipeline itself)
VARIANTS: dict[str, tuple[str, dict[str, int]] | None] = {
    "fp32": None,
    "w8a8": ("w8a8-static", {"calibration_prompts": 1, "check_images": 0}),
    "w4": ("w4a16-g128", {"check_images": 0}),
}
GB = 1e9
DENOISERS = ("transformer", "unet")  # quantization.blocks.DENOISER_ATTRS, without torch


# -- the pipelines ---------------------------------------------------------------------------


def sd15_pipeline():
    from bench.quantize_cost import build_pipeline

    return build_pipeline("sd15", None)


def flux_small_pipeline(double: int = 2, single: int = 4, t5_layers: int = 2):
    """Flux.1-dev's pipeline at real width, ``double`` + ``single`` transformer blocks and
    ``t5_layers`` T5 layers, random weights, fp32 on the CPU."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import (
        AutoTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    from bench.full_size import clip_l, sd_vae
    from bench.previews import MODELS as EMBEDDED

    clip_tokenizer = AutoTokenizer.from_pretrained(EMBEDDED / "t2i-digits" / "tokenizer")
    clip_tokenizer.model_max_length = 77
    words = sorted({w for p in PROMPTS for w in p.split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    t5_tokenizer = T5Tokenizer(
        vocab=vocab + [(f"▁{w}", -3.0) for w in words], extra_ids=0, model_max_length=512
    )
    torch.manual_seed(0)
    clip = clip_l(clip_tokenizer)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=t5_layers,
            num_heads=64,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32,
            layer_norm_epsilon=1e-6,
            tie_word_embeddings=False,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
        )
    )
    vae = sd_vae(
        latent_channels=16,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=clip.eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=t5.eval(),
        tokenizer_2=t5_tokenizer,
        transformer=transformer.eval(),
    )


@dataclass(frozen=True)
class Arch:
    build: Callable[[], object]
    description: str
    size: str  # the registry's image size, WxH
    quantize_px: int | None = None  # probe and calibrate at this size (None: the pipeline's)


ARCHS = {
    "sd15": Arch(
        sd15_pipeline,
        "Stable Diffusion 1.5 (UNet 320/640/1280/1280, CLIP ViT-L/14 text tower, SD VAE), "
        "random weights, fp32",
        "512x512",
    ),
    "flux-small": Arch(
        flux_small_pipeline,
        "Flux.1-dev at real width with fewer layers (transformer: 2 of 19 double-stream + 4 of "
        "38 single-stream blocks, width 3072; T5-XXL encoder: 2 of 24 layers, width 4096; "
        "CLIP ViT-L/14 text tower; Flux VAE), random weights, fp32",
        "1024x1024",
        quantize_px=256,
    ),
}


# -- building and quantizing (stages timed, reused when already done) ------------------------


def build_folder(arch: str, work: Path) -> tuple[Path, Path, bool]:
    """The pipeline folder and its prompts file; built unless a previous run left them
    (then False)."""
    from pipelines.loader import save_pipeline

    folder, prompts = work / "pipeline", work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    if folder.is_dir():
        return folder, prompts, False
    partial = work / "pipeline.partial"  # renamed when complete: a killed build is redone
    shutil.rmtree(partial, ignore_errors=True)
    pipe = ARCHS[arch].build()
    params = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in pipe.components.items()
        if hasattr(module, "parameters")
    }
    sizes = ", ".join(f"{n} {c / 1e6:.0f}M" for n, c in params.items())
    print(f"  parameters: {sizes}; saving {4 * sum(params.values()) / GB:.1f} GB", flush=True)
    save_pipeline(pipe, partial)
    partial.rename(folder)
    del pipe
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # GBs this process no longer needs, given back
    return folder, prompts, True


def quantize_command(
    folder: Path, prompts: Path, variant: str, out: Path, px: int | None
) -> list[str]:
    """``python -m quantization quantize ...`` for a variant, less the interpreter; with
    ``px``, this module's ``--child-quantize`` that calls the same function at that size."""
    recipe, options = VARIANTS[variant] or ("", {})
    if px is not None:
        child = ["-m", "bench.shared_memory", "--child-quantize", str(folder), str(prompts)]
        return [*child, variant, str(out), str(px)]
    flags = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    args = ["-m", "quantization", "quantize", str(folder), "--prompts", str(prompts)]
    return [*args, "--recipe", recipe, *flags, "--out", str(out)]


def quantize_at(folder: Path, prompts: Path, variant: str, out: Path, px: int) -> None:
    """What ``python -m quantization quantize`` does (the same function, options and
    artifact), with the pipeline sampling ``px`` x ``px`` images while it probes and
    calibrates: Flux's pipeline has no setting for its default size (1024 px), where one
    denoiser call of flux-small takes minutes on this CPU. The weights do not depend on it;
    w8a8's activation scales come from that size's calls."""
    from quantization import QuantizeOptions, quantize
    from quantization.artifact import open_source
    from quantization.calibration import resolve_conditions
    from quantization.progress import Bars

    recipe, options = VARIANTS[variant] or ("", {})
    pipe = open_source(folder)
    pipe.default_sample_size = px // pipe.vae_scale_factor
    conditions = resolve_conditions(pipe, folder, prompts)
    given = QuantizeOptions(conditions=conditions, **options)
    done = quantize(pipe, recipe, options=given, source=str(folder), progress=Bars())
    done.save(out)


def run_quantize(args: list[str], out: Path, log: Path) -> float:
    """Run the quantizing process (it prints its plan of work, then a bar per stage with its
    ETA); its wall seconds. The manifest is the last file it writes: a folder without one is
    a killed run's, removed first."""
    shutil.rmtree(out, ignore_errors=True)
    done = run_logged(args, log, log.with_suffix(".stdout"))
    if done.rc != 0:
        raise SystemExit(f"quantize failed (log {log}):\n{done.error()}")
    return done.seconds


def write_registry(work: Path, folder: Path, size: str) -> Path:
    lines = [f"[models.{MODEL}]", f'source = "{folder}"', 'device = "cpu"', f'sizes = ["{size}"]']
    for variant, how in VARIANTS.items():
        lines.append(f"\n[models.{MODEL}.variants.{variant}]")
        lines.append('dtype = "fp32"' if how is None else f'artifact = "{work / f"art-{variant}"}"')
    path = work / "registry.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- measuring, in a fresh process -----------------------------------------------------------


@dataclass
class Load:
    """One variant loaded into a process's ``Components``, and the process after it."""

    variant: str
    estimate_bytes: int  # estimate_bytes_needed before the load
    added_bytes: int  # what Components.total() grew by
    total_bytes: int  # Components.total() after the load
    once_bytes: int  # the same modules' tensors, each counted once (tied weights once)
    denoiser_bytes: int  # the variant's denoiser (Loaded.denoiser_weight_bytes)
    rss_bytes: int  # VmRSS after the load and every held weight read once (paged in)
    rss_anon_bytes: int
    rss_file_bytes: int  # weights diffusers maps from safetensors files count here
    rss_as_loaded_bytes: int  # VmRSS right after the load: mapped weights not yet read
    hwm_bytes: int  # VmHWM: the process's peak so far
    seconds: float
    held: list[dict] = field(default_factory=list)  # per identity: component, source, bytes, users


@dataclass
class Process:
    """A fresh process that loaded ``variants`` one after another into one ``Components``."""

    variants: list[str]
    baseline_rss_bytes: int  # after the imports, before any load
    loads: list[Load]
    # VmRSS after the last load once glibc's malloc_trim(0) has returned the heap's free
    # memory to the system: what the loads freed but the allocator kept (not a worker's view)
    trimmed_rss_bytes: int = 0
    wall_s: float = 0.0  # the whole process, from the parent

    @property
    def last(self) -> Load:
        return self.loads[-1]


def memory() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, in bytes."""
    wanted = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "hwm"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[wanted[key]] = int(value.split()[0]) * 1024
    return out


def plain_tensors(module: object):
    """A module's parameters and buffers as plain tensors, a quantized tensor subclass as the
    tensors inside it (nothing for a tokenizer or a scheduler)."""
    import torch

    def inner(tensor: torch.Tensor):
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(
            tensor, "__tensor_flatten__"
        ):
            for name in tensor.__tensor_flatten__()[0]:
                yield from inner(getattr(tensor, name))
        else:
            yield tensor.detach()

    if isinstance(module, torch.nn.Module):
        for tensor in module.state_dict(keep_vars=True).values():
            yield from inner(tensor)


def page_in(module: object) -> None:
    """Read one byte of every 4 KiB page of a module's tensors: weights that diffusers maps
    from their safetensors files become resident, as they are once the module has run."""
    import torch

    with torch.no_grad():
        for tensor in plain_tensors(module):
            if tensor.numel():
                int(tensor.contiguous().reshape(-1).view(torch.uint8)[::4096].sum())


def once_bytes(modules: list[object], seen: set | None = None) -> int:
    """Bytes of the modules' tensors, each counted once however many names it has: a tied
    weight (T5's ``shared`` and ``encoder.embed_tokens``) is one tensor in memory but two
    entries of ``state_dict``, which ``Components`` counts twice."""
    seen = set() if seen is None else seen
    total = 0
    for module in modules:
        for t in plain_tensors(module):
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def measure_process(registry_path: Path, variants: list[str]) -> Process:
    """Load ``variants`` of the registry's model one after another into one ``Components``,
    as a worker hosting them does; the numbers after each load."""
    from app.registry import load_registry
    from app.worker.components import Components
    from app.worker.pipeline import estimate_bytes_needed, load

    spec = load_registry(registry_path).models[MODEL]
    components = Components()
    gc.collect()
    baseline = memory()["rss"]
    loads, kept = [], []
    for name in variants:
        variant = spec.variants[name]
        estimate = estimate_bytes_needed(spec, variant, "cpu", components)
        before = components.total()
        print(f"  loading {name}: estimated +{estimate / GB:.2f} GB", file=sys.stderr, flush=True)
        start = time.perf_counter()
        loaded = load(spec, variant, "cpu", components, metadata=False)
        seconds = time.perf_counter() - start
        kept.append(loaded)  # resident, as in a worker
        gc.collect()
        as_loaded = memory()["rss"]
        for identity in components.bytes():
            page_in(components.get(identity))
        mem = memory()
        held = [
            {
                "component": identity.component,
                "source": identity.source,
                "bytes": size,
                "once_bytes": once_bytes([components.get(identity)]),
                "users": sorted(components.users(identity)),
            }
            for identity, size in components.bytes().items()
        ]
        once = once_bytes([components.get(identity) for identity in components.bytes()])
        loads.append(
            Load(
                variant=name,
                estimate_bytes=estimate,
                added_bytes=components.total() - before,
                total_bytes=components.total(),
                once_bytes=once,
                denoiser_bytes=loaded.denoiser_weight_bytes,
                rss_bytes=mem["rss"],
                rss_anon_bytes=mem["anon"],
                rss_file_bytes=mem["file"],
                rss_as_loaded_bytes=as_loaded,
                hwm_bytes=mem["hwm"],
                seconds=round(seconds, 2),
                held=held,
            )
        )
        print(
            f"  loaded {name} in {seconds:.1f} s: held {components.total() / GB:.2f} GB, "
            f"RSS {mem['rss'] / GB:.2f} GB",
            file=sys.stderr,
            flush=True,
        )
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return Process(variants, baseline, loads, trimmed_rss_bytes=memory()["rss"])


def run_process(registry_path: Path, variants: list[str], out: Path) -> Process:
    """``measure_process`` in a fresh interpreter (stderr shown as it goes)."""
    args = [sys.executable, "-m", "bench.shared_memory", "--child", str(registry_path)]
    args += [*variants, "--child-out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(args, cwd=ROOT, env=env, check=True)
    data = json.loads(out.read_text())
    loads = [Load(**row) for row in data.pop("loads")]
    data["wall_s"] = round(time.perf_counter() - start, 2)
    return Process(**data, loads=loads)


# -- the report ------------------------------------------------------------------------------


@dataclass
class Report:
    arch: str
    description: str
    parameters: dict[str, int]  # per pipeline component
    quantized: dict[str, dict]  # variant -> recipe, command, reused, manifest sizes
    shared: Process
    separate: dict[str, Process]
    stages: dict[str, dict]  # name -> wall seconds, and whether this run ran it

    def totals(self) -> dict:
        """Shared (the one process after its last load) against separate (summed over the
        processes), and separate / shared."""
        alone = [p.last for p in self.separate.values()]
        pairs = {
            "held": (self.shared.last.total_bytes, sum(ld.total_bytes for ld in alone)),
            "once": (self.shared.last.once_bytes, sum(ld.once_bytes for ld in alone)),
            "rss": (self.shared.last.rss_bytes, sum(ld.rss_bytes for ld in alone)),
            "trimmed_rss": (
                self.shared.trimmed_rss_bytes,
                sum(p.trimmed_rss_bytes for p in self.separate.values()),
            ),
            "peak_rss": (self.shared.last.hwm_bytes, sum(ld.hwm_bytes for ld in alone)),
        }
        out: dict = {}
        for name, (shared, separate) in pairs.items():
            out[f"shared_{name}_bytes"] = shared
            out[f"separate_{name}_bytes"] = separate
            out[f"{name}_ratio"] = round(separate / shared, 3)
        return out

    def to_json(self) -> dict:
        return {
            "arch": self.arch,
            "description": self.description,
            "parameters": self.parameters,
            "quantized": self.quantized,
            "totals": self.totals(),
            "shared": asdict(self.shared),
            "separate": {v: asdict(p) for v, p in self.separate.items()},
            "stages": self.stages,
        }

    def markdown(self, command: str) -> str:
        t = self.totals()

        def gb(b: int) -> str:
            return f"{b / GB:.2f}"

        lines = [
            f"# Resident bytes, shared against separate: {self.arch}",
            "",
            f"{self.description}. `{command}`; CPU, eager, nothing compiled; GB = 10^9 bytes.",
            "",
            "- *held*: `Components.total()`, the bytes of the parameters and buffers of the "
            "modules a worker holds (what its budget and `/v1/models` count);",
            "- *once*: the same modules' tensors, each counted once (a tied weight has two "
            "names in `state_dict`; `Components` counts it twice);",
            "- *RSS*: the process's VmRSS after the load, every held weight read once (diffusers "
            "maps safetensors files: unread weights are not yet resident);",
            "- *estimate*: `estimate_bytes_needed` before the load.",
            "",
            "Shared: one process loads the variants in this order into one `Components`; a row "
            "is the process after that load. Alone: the variant in a fresh process of its own.",
            "",
            "| variant | recipe | denoiser GB | other components added GB | estimate GB "
            "| held added GB | shared: held GB | shared: RSS GB | alone: held GB "
            "| alone: RSS GB | alone: peak RSS GB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for load in self.shared.loads:
            alone = self.separate[load.variant].last
            recipe = (VARIANTS[load.variant] or ("fp32",))[0]
            lines.append(
                f"| {load.variant} | {recipe} | {gb(load.denoiser_bytes)} "
                f"| {gb(load.added_bytes - load.denoiser_bytes)} | {gb(load.estimate_bytes)} "
                f"| {gb(load.added_bytes)} | {gb(load.total_bytes)} | {gb(load.rss_bytes)} "
                f"| {gb(alone.total_bytes)} | {gb(alone.rss_bytes)} | {gb(alone.hwm_bytes)} |"
            )
        lines += [
            "",
            "| all three | shared (one process) GB | separate (three, summed) GB "
            "| separate / shared |",
            "|---|---:|---:|---:|",
        ]
        for name, label in (
            ("held", "held"),
            ("once", "held, each tensor once"),
            ("rss", "**RSS**"),
            ("trimmed_rss", "RSS after `malloc_trim(0)`"),
            ("peak_rss", "peak RSS while loading (VmHWM)"),
        ):
            lines.append(
                f"| {label} | {gb(t[f'shared_{name}_bytes'])} "
                f"| {gb(t[f'separate_{name}_bytes'])} | {t[f'{name}_ratio']}x |"
            )
        lines += [
            "",
            f"A process's RSS before any load (torch, diffusers and the app imported): "
            f"{gb(self.shared.baseline_rss_bytes)} GB; separate processes pay it once each. "
            "`malloc_trim(0)` (after the last load, a diagnostic: a worker does not call it) "
            "gives back the heap the loads freed and glibc kept: a quantized denoiser is built "
            "as a float model first, then quantized and its saved tensors loaded.",
            "",
            "| shared process: component | loaded from | held GB | once GB | used by |",
            "|---|---|---:|---:|---|",
        ]
        sources = {str(p): name for name, p in self._sources().items()}
        for held in self.shared.last.held:
            where = sources.get(held["source"], held["source"])
            users = ", ".join(u.split("/", 1)[-1] for u in held["users"])
            lines.append(
                f"| {held['component']} | {where} | {gb(held['bytes'])} "
                f"| {gb(held['once_bytes'])} | {users} |"
            )
        denoiser = next(
            h["component"] for h in self.shared.last.held if h["component"] in DENOISERS
        )
        unshared = sorted(
            {
                held["component"]
                for held in self.shared.last.held
                if held["component"] != denoiser and sources.get(held["source"]) != self._model
            }
        )
        if unshared:
            lines += [
                "",
                f"Not shared: {', '.join(unshared)}, loaded again from each artifact "
                "(`quantization.artifact.shared_components` found the artifact's files "
                "differ from the model's).",
            ]
        lines += [
            "",
            "| stage | wall s | |",
            "|---|---:|---|",
            *[
                f"| {name} | {row['seconds']} | {'' if row['this_run'] else 'an earlier run'} |"
                for name, row in self.stages.items()
            ],
            "",
            "Load seconds in the shared process: "
            + ", ".join(f"{ld.variant} {ld.seconds}" for ld in self.shared.loads)
            + "; alone: "
            + ", ".join(f"{v} {p.last.seconds}" for v, p in self.separate.items())
            + ". A stage whose folder or artifact an earlier run left shows that run's "
            "seconds (this run reused it). Quantized with "
            + "; ".join(f"`{q['command']}`" for q in self.quantized.values() if "command" in q)
            + ".",
        ]
        px = ARCHS[self.arch].quantize_px
        if px is not None:
            lines += [
                "",
                f"`--child-quantize` calls `quantization.quantize`, the function the CLI calls, "
                f"with the CLI's options, the pipeline sampling {px} x {px} images while it "
                "probes and calibrates: FluxPipeline has no setting for its 1024 px default, "
                "at which one denoiser call takes minutes on this CPU. Weight bytes do not "
                "depend on it.",
            ]
        return "\n".join(lines) + "\n"

    _model = "the model's folder"

    @classmethod
    def from_json(cls, data: dict) -> Report:
        """The report a results file holds (``to_json``'s fields; the record's own ignored)."""

        def process(d: dict) -> Process:
            return Process(**{**d, "loads": [Load(**ld) for ld in d["loads"]]})

        return cls(
            data["arch"],
            data["description"],
            data["parameters"],
            data["quantized"],
            process(data["shared"]),
            {v: process(p) for v, p in data["separate"].items()},
            data["stages"],
        )

    def _sources(self) -> dict[str, Path]:
        artifacts = {
            f"the {v} artifact": Path(q["artifact"])
            for v, q in self.quantized.items()
            if "artifact" in q
        }
        return {**artifacts, self._model: Path(self.quantized["fp32"]["folder"])}


# -- the command -----------------------------------------------------------------------------


class Stages:
    """Each stage's wall seconds, kept in the work folder: a stage reused from an earlier run
    (its folder or artifact already there) reports that run's seconds, marked as such, and
    the seconds an earlier run took are the estimate printed before a stage starts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.earlier: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
        self.rows: dict[str, dict] = {}

    def start(self, name: str, what: str) -> float:
        before = self.earlier.get(name)
        cost = f"; an earlier run took {before:.0f} s" if before is not None else ""
        print(f"\n== {name}: {what}{cost}", flush=True)
        return time.perf_counter()

    def done(self, name: str, start: float, reused: bool = False) -> None:
        seconds = self.earlier.get(name) if reused else round(time.perf_counter() - start, 2)
        self.rows[name] = {"seconds": seconds, "this_run": not reused}
        if not reused and seconds is not None:
            self.earlier[name] = seconds
            self.path.write_text(json.dumps(self.earlier, indent=1) + "\n")


def run_arch(arch: str, work: Path) -> Report:
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(work / "stages.json")
    start = stages.start("build", f"the {arch} pipeline, random weights, saved fp32 to {work}")
    folder, prompts, built = build_folder(arch, work)
    stages.done("build", start, reused=not built)
    quantized: dict[str, dict] = {"fp32": {"recipe": "fp32", "folder": str(folder)}}
    for variant, how in VARIANTS.items():
        if how is None:
            continue
        out = work / f"art-{variant}"
        args = quantize_command(folder, prompts, variant, out, ARCHS[arch].quantize_px)
        reused = (out / "manifest.json").is_file()
        name = f"quantize {variant}"
        start = stages.start(
            name,
            f"{out} reused"
            if reused
            else f"`{shlex.join(['python', *args])}`: a probe (2 denoiser calls, a block "
            "quantized, a VAE decoding), then the plan of work it prints, then its stages",
        )
        if not reused:
            run_quantize(args, out, work / f"{variant}.log")
        stages.done(name, start, reused=reused)
        manifest = json.loads((out / "manifest.json").read_text())
        quantized[variant] = {
            "recipe": how[0],
            "command": shlex.join(["python", *args]),
            "artifact": str(out),
            "reused": reused,
            "backend": manifest.get("backend"),
            "sizes": manifest.get("sizes"),
            "work_actual_s": (manifest.get("work") or {}).get("actual"),
        }
        print(f"  {variant}: denoiser {manifest['sizes']['denoiser_weight_bytes'] / GB:.2f} GB")
    registry = write_registry(work, folder, ARCHS[arch].size)
    variants = list(VARIANTS)
    start = stages.start("shared", f"one process loads {', '.join(variants)} into one Components")
    shared = run_process(registry, variants, work / "shared.json")
    stages.done("shared", start)
    separate = {}
    for variant in variants:
        start = stages.start(f"separate {variant}", f"{variant} alone in a fresh process")
        separate[variant] = run_process(registry, [variant], work / f"separate-{variant}.json")
        stages.done(f"separate {variant}", start)
    index = json.loads((folder / "model_index.json").read_text())
    parameters = {}
    for name in index:
        weights = sorted((folder / name).glob("*.safetensors")) if not name.startswith("_") else []
        if weights:
            parameters[name] = _parameter_count(weights)
    return Report(
        arch, ARCHS[arch].description, parameters, quantized, shared, separate, stages.rows
    )


def _parameter_count(files: list[Path]) -> int:
    """Elements in the weight files, read from their headers."""
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                count = 1
                for dim in f.get_slice(key).get_shape():
                    count *= dim
                total += count
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.shared_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", action="append", choices=list(ARCHS), help="sd15 and/or flux-small")
    p.add_argument("--work", type=Path, default=WORK, help="default %(default)s/<arch>")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown")
    p.add_argument(
        "--markdown",
        type=Path,
        metavar="RESULTS_JSON",
        help="write the Markdown report of a results file this command wrote beside it, and stop",
    )
    p.add_argument("--child", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-quantize", nargs=5, metavar="ARG", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_quantize:  # FOLDER PROMPTS VARIANT OUT PX
        folder, prompts, variant, out, px = args.child_quantize
        quantize_at(Path(folder), Path(prompts), variant, Path(out), int(px))
        return 0
    if args.child:  # one measuring process: REGISTRY VARIANT...
        process = measure_process(Path(args.child[0]), args.child[1:])
        args.child_out.write_text(json.dumps(asdict(process)))
        return 0
    if args.markdown:
        data = json.loads(args.markdown.read_text())
        args.markdown.with_suffix(".md").write_text(
            Report.from_json(data).markdown(data["command"])
        )
        print(f"wrote {args.markdown.with_suffix('.md')}")
        return 0
    command = "python -m bench.shared_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    for arch in args.arch or ["sd15"]:
        report = run_arch(arch, args.work / arch)
        out = args.out / f"shared-memory-{arch}.json"
        save(out, command, **machine_info("cpu"), **report.to_json())
        out.with_suffix(".md").write_text(report.markdown(command))
        print(report.markdown(command))
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
