"""Disk and hub I/O of the package: open a source pipeline, write and read quantized artifacts.

An artifact is a diffusers pipeline folder whose denoiser is quantized::

    model_index.json, scheduler/, vae/, text_encoder/, ...   the source's other components
    <denoiser>/config.json                                     the denoiser's diffusers config
    <denoiser>/quantized.safetensors                           quantized weights, scales, smoothing
                                                               (+ the backend's JSON metadata)
    plan.json                                                  per layer: dtypes, group size, ...
    manifest.json                                              backend, recipe, calibration,
                                                               sizes, versions, sha256 of files
    report.md, *.png                                           what was measured, with plots

The quantized weights deliberately do not use diffusers' file name: a stock
``from_pretrained`` on the folder fails loudly instead of loading random weights. Only
safetensors and JSON are written or read; nothing is unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipelines.loader import compile_denoiser, load_pipeline, save_pipeline
from quantization import backends
from quantization.backends import x86_kernels
from quantization.blocks import denoiser_attr
from quantization.plan import LayerPlan, plan_from_json, plan_to_json
from quantization.types import BACKENDS

__all__ = [
    "FORMAT",
    "ArtifactError",
    "denoiser_sizes",
    "load_quantized",
    "load_quantized_denoiser",
    "open_source",
    "read_analysis",
    "save_analysis",
    "save_artifact",
    "sha256_of",
    "shared_components",
]

FORMAT = "quantized-diffusers/2"
WEIGHTS_FILE = "quantized.safetensors"
PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ArtifactError(Exception):
    """An artifact or source that cannot be used: tampered, incomplete, or unreachable."""


def open_source(source: str | Path, *, torch_dtype: torch.dtype = torch.float32):
    """A pipeline from a local folder or a hub id (from the local cache when offline)."""
    local = Path(source).is_dir()
    try:
        pipe = load_pipeline(source, torch_dtype=torch_dtype, local_files_only=local)
    except (OSError, ValueError) as e:
        where = (
            "folder" if local else "hub id (is the hub reachable, or the model in the local cache?)"
        )
        raise ArtifactError(f"cannot load a pipeline from {source!s} as a {where}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def denoiser_sizes(
    fp_denoiser: torch.nn.Module, state: dict[str, torch.Tensor], plan: dict[str, LayerPlan]
) -> dict:
    """Bytes of the quantized denoiser: quantized layers, the rest, and fp16 / fp32 for scale."""
    params = sum(p.numel() for p in fp_denoiser.parameters())
    layer_bytes = sum(backends.tensor_bytes(state, prefix=f"{name}.") for name in plan)
    total = backends.tensor_bytes(state)
    fp_layer_params = sum(
        p.numel() for n in plan for p in fp_denoiser.get_submodule(n).parameters(recurse=False)
    )
    return {
        "denoiser_weight_bytes": total,
        "quantized_layer_bytes": layer_bytes,
        "unquantized_bytes": total - layer_bytes,
        "denoiser_fp16_bytes": params * 2,
        "denoiser_fp32_bytes": params * 4,
        "quantized_layers_fp16_bytes": fp_layer_params * 2,
        "ratio_to_fp16": round(total / (params * 2), 4),
    }


# CPU features that choose torch's kernels (oneDNN / FBGEMM): where they differ, int8 and fp32
# results round differently, and end-to-end numbers move (AMX against AVX-512 VNNI: tenths of
# a dB after sampling). Recorded with every artifact, so a replay knows whether to expect the
# same bits.
KERNEL_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "amx_fp16",
)


def measured_on() -> dict:
    """The machine the artifact's numbers were measured on: architecture and kernel flags."""
    return {
        "machine": platform.machine(),
        "cpu_kernel_flags": sorted(x86_kernels.cpu_flags() & set(KERNEL_FLAGS)),
    }


def replays_with_fewer_codes(manifest: dict) -> bool:
    """Whether this CPU runs an x86 artifact with coarser inputs than its numbers were
    measured with: recorded where oneDNN has VNNI (8-bit input codes), loaded where it has
    not (7-bit codes, ``x86_kernels.U8_MAX``). Its recorded fidelity then overstates what
    this CPU gives (t2i-digits w8a8: 37.483 dB of latent SQNR recorded, 33.725 on an AVX2-only
    EPYC)."""
    recorded = set(manifest.get("measured_on", {}).get("cpu_kernel_flags", []))
    return (
        manifest.get("backend") == "x86"
        and bool(recorded & x86_kernels.VNNI_FLAGS)
        and x86_kernels.U8_MAX < 255
    )


def bf16_layers_in_float(manifest: dict) -> int:
    """How many of an x86 artifact's bf16 layers this CPU multiplies in float32 (it has no
    bf16 in hardware: ``x86_kernels.NATIVE_BF16``); 0 where it multiplies them in bf16 or the
    artifact has none. Their output is then closer to the float model's than a bf16 product,
    and their speed float32's (``python -m bench.x86_bf16`` measures both)."""
    if manifest.get("backend") != "x86" or x86_kernels.NATIVE_BF16:
        return 0
    return sum(1 for spec in manifest.get("layers", {}).values() if spec.get("weights") == "bf16")


def _versions(backend) -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        **backend.versions(),
    }


def save_artifact(
    out: Path,
    fp_pipe,
    quantized: torch.nn.Module,
    plan: dict[str, LayerPlan],
    manifest: dict,
    *,
    backend: str,
    dtype: str = "fp32",
    report: str | None = None,
) -> dict:
    """Write the artifact folder; returns the manifest as written (files and sizes added)."""
    impl = backends.get(backend)
    attr = denoiser_attr(fp_pipe)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fp_denoiser = getattr(fp_pipe, attr)
    # the FP weights are not written only to be deleted (3 GB for DiT-XL/2): its config only
    fp_denoiser.save_pretrained = lambda folder, **kw: fp_denoiser.save_config(folder)
    try:
        save_pipeline(fp_pipe, out)
    finally:
        del fp_denoiser.save_pretrained
    denoiser_dir = out / attr
    for stale in denoiser_dir.glob("diffusion_pytorch_model*"):
        stale.unlink()
    state, metadata = impl.state_dict(quantized)
    save_file(state, denoiser_dir / WEIGHTS_FILE, metadata={**metadata, "format": FORMAT})
    (out / PLAN_FILE).write_text(json.dumps(plan_to_json(plan), indent=1) + "\n")
    files = {
        str(p.relative_to(out)): {"sha256": sha256_of(p), "bytes": p.stat().st_size}
        for p in [*sorted(out.rglob("*.safetensors")), out / PLAN_FILE]
    }
    full = {
        "format": FORMAT,
        **manifest,
        "backend": backend,
        "denoiser": attr,
        "denoiser_class": type(getattr(fp_pipe, attr)).__name__,
        "dtype": dtype,
        "layers": {
            n: {
                "weights": lp.weights,
                "activations": lp.activations or "none",
                "group_size": lp.group_size,
                "granularity": lp.spec.granularity,
            }
            for n, lp in sorted(plan.items())
        },
        "sizes": denoiser_sizes(getattr(fp_pipe, attr), state, plan),
        "files": files,
        "versions": _versions(impl),
        "measured_on": measured_on(),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(full, indent=1) + "\n")
    if report is not None:
        (out / "report.md").write_text(report)
    return full


def read_manifest(path: Path) -> dict:
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise ArtifactError(f"{path} is not a quantized artifact: no {MANIFEST_FILE}")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise ArtifactError(
            f"{file}: format {manifest.get('format')!r}, this package reads {FORMAT!r} "
            "(quantize the source again)"
        )
    if manifest.get("backend") not in BACKENDS:
        raise ArtifactError(f"{file}: backend {manifest.get('backend')!r} is not one of {BACKENDS}")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Every weight file the manifest lists is there with its sha256; no unlisted one is."""
    path = Path(path)
    listed = manifest["files"]
    present = {str(p.relative_to(path)) for p in path.rglob("*.safetensors")}
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise ArtifactError(f"{path}: weight files not in the manifest: {unlisted}")
    for rel, info in listed.items():
        file = path / rel
        if not file.is_file():
            raise ArtifactError(f"{path}: {rel} is missing")
        digest = sha256_of(file)
        if digest != info["sha256"]:
            raise ArtifactError(
                f"{path}: {rel} has sha256 {digest[:12]}..., "
                f"the manifest says {info['sha256'][:12]}...: "
                "the file was modified or corrupted; refusing to load it"
            )


def build_quantized_denoiser(
    path: Path, manifest: dict, plan: dict[str, LayerPlan]
) -> torch.nn.Module:
    """The denoiser class from its config, prepared by the plan on the artifact's backend,
    its saved tensors loaded with strict key checks."""
    import diffusers

    impl = backends.get(manifest["backend"])
    attr = manifest["denoiser"]
    cls = getattr(diffusers, manifest["denoiser_class"])
    model = cls.from_config(cls.load_config(path / attr)).to(DTYPES[manifest["dtype"]]).eval()
    try:
        applied = impl.prepare(model, plan)
    except ValueError as e:
        raise ArtifactError(f"{path}: the plan cannot be applied here: {e}") from None
    for name, lp in plan.items():
        if applied[name].group_size != lp.group_size:
            raise ArtifactError(
                f"{name}: plan says group size {lp.group_size}, "
                f"the layer allows {applied[name].group_size}"
            )
    file = path / attr / WEIGHTS_FILE
    tensors = load_file(file)
    with safe_open(file, framework="pt") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if k != "format"}
    try:
        impl.load_state(model, tensors, metadata)
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"{file}: {e.args[0]}") from None
    return model


def load_quantized_denoiser(path: str | Path) -> tuple[dict, torch.nn.Module]:
    """The artifact's manifest and its quantized denoiser alone (on the CPU), for a server
    that brings the other components itself (``shared_components`` says which are the
    source's own); refuses tampered files."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    plan = plan_from_json(json.loads((path / PLAN_FILE).read_text()))
    if set(plan) != set(manifest["layers"]):
        raise ArtifactError(f"{path}: plan.json and manifest.json list different layers")
    return manifest, build_quantized_denoiser(path, manifest, plan)


def load_quantized(path: str | Path, *, device: str = "cpu", compile: bool = False):
    """The pipeline of an artifact, its denoiser quantized as planned, on ``device``; refuses
    tampered files. ``compile``: the denoiser ``torch.compile``d, exactly as a worker serving
    the variant with ``compile = true`` runs it (the worker loads the same denoiser with
    ``load_quantized_denoiser`` and compiles it the same way); the compiling happens at the
    first calls."""
    manifest, model = load_quantized_denoiser(path)
    components: dict = {manifest["denoiser"]: model}
    pipe = load_pipeline(path, torch_dtype=DTYPES[manifest["dtype"]], **components)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if compile:
        compile_denoiser(pipe)
    return pipe


def shared_components(path: str | Path, source: str | Path) -> set[str]:
    """The artifact's components other than its denoiser whose files are byte for byte the
    source folder's (same names, sizes and sha256): a server may use the source's copy,
    loaded once for every variant. The artifact's weight digests come from its manifest."""
    path, source = Path(path), Path(source)
    manifest = read_manifest(path)
    listed = {rel: info["sha256"] for rel, info in manifest["files"].items()}
    index = json.loads((path / "model_index.json").read_text())
    same = set()
    for name, value in index.items():
        if name.startswith("_") or name == manifest["denoiser"] or not isinstance(value, list):
            continue
        ours, theirs = path / name, source / name
        if not ours.is_dir() or not theirs.is_dir():
            continue
        files = sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file())
        if files != sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file()):
            continue
        if all(_same_file(ours / f, theirs / f, listed.get(f"{name}/{f}")) for f in files):
            same.add(name)
    return same


# what save_pretrained writes into a config that says where and by which version it was saved
_PROVENANCE_KEYS = {"_name_or_path", "_diffusers_version", "transformers_version"}


def _same_file(ours: Path, theirs: Path, digest: str | None) -> bool:
    if ours.suffix == ".json":  # a config: equal but for where and by what it was saved
        a, b = (json.loads(p.read_text()) for p in (ours, theirs))
        if isinstance(a, dict) and isinstance(b, dict):
            a, b = ({k: v for k, v in d.items() if k not in _PROVENANCE_KEYS} for d in (a, b))
        return a == b
    if ours.stat().st_size != theirs.stat().st_size:
        return False
    if digest is None:  # a vocabulary or other small file: compared directly
        return ours.read_bytes() == theirs.read_bytes()
    return _digest(theirs, theirs.stat().st_mtime_ns) == digest


@functools.lru_cache(maxsize=256)
def _digest(path: Path, mtime_ns: int) -> str:
    """sha256 of a source file, once per process (its mtime in the key)."""
    return sha256_of(path)


ANALYSIS_TENSORS = "analysis.safetensors"
ANALYSIS_JSON = "analysis.json"


def save_analysis(folder: Path, table, report, *, stats, treatments, latents) -> None:
    """What ``quantize --analysis`` plans from: the sensitivity table, the report, the
    calibration ranges (per layer and call), the local treatments and FP's final latents of
    the measuring conditions (safetensors and JSON)."""
    from quantization.report import frontier_markdown, plot_frontier

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table.save(folder)
    tensors: dict[str, torch.Tensor] = {"latents": latents.contiguous()}
    meta: dict = {
        "time_sensitive": sorted(treatments.time_sensitive),
        "drifts": treatments.drifts,
        "smoothing": {
            n: {k: v for k, v in s.items() if k != "scale"} for n, s in treatments.smoothing.items()
        },
        "stats": None,
    }
    for n, s in treatments.smoothing.items():
        tensors[f"smooth/{n}"] = s["scale"].contiguous()
    if stats is not None:
        meta["stats"] = {
            "steps": stats.steps,
            "timesteps": stats.timesteps,
            "ndim": stats.ndim,
            "calls": {n: len(v) for n, v in stats.channels.items()},
        }
        for kind, store in (
            ("stats", stats.channels),
            ("lows", stats.lows),
            ("highs", stats.highs),
        ):
            for n, values in store.items():
                tensors[f"{kind}/{n}"] = torch.stack(values).contiguous()
    save_file(tensors, folder / ANALYSIS_TENSORS)
    (folder / ANALYSIS_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    if report is not None:
        (folder / "sensitivity.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
        (folder / "frontier.md").write_text(frontier_markdown(report.frontier))
        plot_frontier(report.frontier, folder / "frontier.png")


def read_analysis(folder: Path) -> dict:
    """``save_analysis``'s folder back: table, stats, treatments, latents."""
    from quantization.activations import ActivationStats
    from quantization.analysis import Treatments
    from quantization.table import SensitivityTable

    folder = Path(folder)
    if (folder / "analysis" / ANALYSIS_JSON).is_file():  # an artifact's
        folder = folder / "analysis"
    if not (folder / ANALYSIS_JSON).is_file():
        raise ArtifactError(f"{folder} holds no saved analysis ({ANALYSIS_JSON}): analyze --out it")
    meta = json.loads((folder / ANALYSIS_JSON).read_text())
    tensors = load_file(folder / ANALYSIS_TENSORS)
    stats = None
    if meta["stats"] is not None:
        st = meta["stats"]

        def per_call(kind: str) -> dict[str, list[torch.Tensor]]:
            # minima and maxima are absent from analyses saved before they were kept
            return {
                n: list(tensors[f"{kind}/{n}"].unbind(0))
                for n in st["calls"]
                if f"{kind}/{n}" in tensors
            }

        stats = ActivationStats(
            steps=list(st["steps"]),
            timesteps=list(st["timesteps"]),
            channels={n: list(tensors[f"stats/{n}"].unbind(0)) for n in st["calls"]},
            ndim={n: int(v) for n, v in st["ndim"].items()},
            lows=per_call("lows"),
            highs=per_call("highs"),
        )
    smoothing = {n: {**s, "scale": tensors[f"smooth/{n}"]} for n, s in meta["smoothing"].items()}
    treatments = Treatments(set(meta["time_sensitive"]), dict(meta["drifts"]), smoothing)
    return {
        "table": SensitivityTable.load(folder),
        "stats": stats,
        "treatments": treatments,
        "latents": tensors.get("latents"),
    }
