"""LoRA in the service, without Redis: the registry's adapters, the `lora` field's checks,
the batch key and the record, and the worker's reading, checking and applying of adapters."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.config import Settings
from app.errors import InvalidRequest
from app.provenance import image_parameters
from app.queue.records import JobRequest, decode, encode_new
from app.registry import RegistryError, load_registry
from app.resolve import Ask, job_request
from app.schemas import GenerationRequest
from app.worker import adapters as worker_adapters
from pipelines import lora
from tests.service.conftest import MODELS

T2I = MODELS / "t2i-digits"
DIT = MODELS / "dit-digits"


def _adapter_file(path: Path, folder: Path, rank: int = 2, seed: int = 0) -> str:
    """A random PEFT adapter on a few attention projections of ``folder``'s denoiser; its
    sha256."""
    skeleton = worker_adapters._skeleton(folder)
    prefix = "transformer." if (folder / "transformer").is_dir() else "unet."
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in skeleton.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_v")):
            down = torch.randn(rank, module.in_features, generator=g) * 0.1
            up = torch.randn(module.out_features, rank, generator=g) * 0.1
            tensors[f"{prefix}{name}.lora_A.weight"] = down
            tensors[f"{prefix}{name}.lora_B.weight"] = up
    save_file(tensors, str(path), metadata={"alpha": str(rank)})
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-registry")
    sha_a = _adapter_file(folder / "a.safetensors", T2I, seed=1)
    sha_b = _adapter_file(folder / "b.safetensors", T2I, rank=3, seed=2)
    (folder / "registry.toml").write_text(
        f"""
[models.t2i]
source = "{T2I}"
max_lora = 2
[models.t2i.adapters.a]
file = "a.safetensors"
sha256 = "{sha_a}"
[models.t2i.adapters.b]
file = "b.safetensors"
sha256 = "{sha_b}"
scale = 0.5
[models.t2i.adapters.c]
file = "a.safetensors"
sha256 = "{sha_a}"
[models.dit]
source = "{DIT}"
"""
    )
    return load_registry(folder / "registry.toml")


def _ask(**fields) -> Ask:
    return Ask(**{"model": "t2i", "prompt": "a red seven on a black background", **fields})


def test_the_registry_lists_adapters_with_their_default_scales(registry):
    spec = registry.models["t2i"]
    assert list(spec.adapters) == ["a", "b", "c"] and spec.max_lora == 2
    assert spec.adapters["a"].scale == 1.0 and spec.adapters["b"].scale == 0.5
    summary = spec.adapters["b"].summary()
    assert summary["bytes"] == spec.adapters["b"].file.stat().st_size
    assert registry.models["dit"].adapters == {}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('file = "a.safetensors"', r"adapters\.x\.sha256: Field required"),
        ('file = "a.safetensors"\nsha256 = "abc"', r"adapters\.x\.sha256: String should match"),
        (
            f'file = "nope.safetensors"\nsha256 = "{"0" * 64}"',
            r"models\.m\.adapters\.x: no adapter",
        ),
        (f'file = "a.safetensors"\nsha256 = "{"0" * 64}"\nscale = 5', r"adapters\.x\.scale"),
        (f'file = "a.safetensors"\nsha256 = "{"0" * 64}"\nrank = 4', r"adapters\.x\.rank: not a"),
    ],
)
def test_registry_errors_name_the_adapter(tmp_path, entry, message):
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "registry.toml").write_text(
        f'[models.m]\nsource = "{T2I}"\n[models.m.adapters.x]\n{entry}\n'
    )
    with pytest.raises(RegistryError, match=message):
        load_registry(tmp_path / "registry.toml")


def test_lora_resolves_names_and_scales_in_order(registry):
    settings = Settings()
    request = job_request(settings, registry, _ask(lora=(("b", None, None), ("a", -1.5, None))))
    assert request.lora == (("b", 0.5), ("a", -1.5))
    assert job_request(settings, registry, _ask()).lora == ()


@pytest.mark.parametrize(
    ("lora", "model", "message"),
    [
        ((("zzz", None, None),), "t2i", "has no adapter 'zzz'; adapters: a, b, c"),
        ((("a", 100.0, None),), "t2i", r"must lie in -2\.\.2; got 100"),
        ((("a", float("nan"), None),), "t2i", "must lie in"),
        ((("a", None, None), ("b", None, None), ("c", None, None)), "t2i", "at most 2"),
        ((("a", None, None), ("a", 0.5, None)), "t2i", "names 'a' twice"),
        ((("a", None, "f" * 64),), "t2i", "no longer makes the same images"),
        ((("a", None, None),), "dit", "has no LoRA adapters"),
    ],
)
def test_bad_lora_is_refused_naming_lora(registry, lora, model, message):
    ask = _ask(model=model, lora=lora, prompt="a seven")
    with pytest.raises(InvalidRequest, match=message) as caught:
        job_request(Settings(), registry, ask)
    assert caught.value.param == "lora"


def test_the_wire_model_takes_the_metadata_it_wrote(registry):
    sha = registry.models["t2i"].adapters["a"].sha256
    body = GenerationRequest(
        model="t2i",
        prompt="a red seven on a black background",
        lora=[{"name": "a", "scale": 0.25, "sha256": sha}],
    )
    assert body.to_job_request(Settings(), registry, None).lora == (("a", 0.25),)
    with pytest.raises(ValueError, match=r"lora\.0\.weight"):
        GenerationRequest(model="t2i", prompt="x", lora=[{"name": "a", "weight": 1}])


def test_jobs_with_other_adapter_sets_never_share_a_batch_and_records_round_trip():
    base = JobRequest("m", "v", "p", 1, 32, 32, 10, 4.5, 1)
    with_a = replace(base, lora=(("a", 1.0),))
    assert base.batch_key() != with_a.batch_key()
    assert with_a.batch_key() != replace(base, lora=(("a", 0.5),)).batch_key()
    assert with_a.batch_key() != replace(base, lora=(("b", 1.0), ("a", 1.0))).batch_key()
    assert with_a.batch_key() == replace(base, seed=9, lora=[["a", 1]]).batch_key()
    fields = encode_new("0" * 32, with_a, 1.0)
    assert json.loads(fields["request"])["lora"] == [["a", 1.0]]
    assert decode(fields).request == with_a


def test_images_say_which_adapter_file_made_them(registry):
    spec = registry.models["t2i"]
    request = JobRequest("t2i", "fp32", "p", 1, 32, 32, 10, 4.5, 7, lora=(("b", 0.5),))
    parameters = image_parameters(request, 0, {"model": "t2i"}, spec.adapters)
    assert parameters["lora"] == [{"name": "b", "scale": 0.5, "sha256": spec.adapters["b"].sha256}]
    assert "lora" not in image_parameters(replace(request, lora=()), 0, {}, spec.adapters)


def test_the_worker_reads_and_checks_every_adapter_naming_a_bad_file(registry, tmp_path):
    spec = registry.models["t2i"]
    adapters = worker_adapters.read_all(spec, T2I)
    assert set(adapters) == {"a", "b", "c"} and adapters["b"].max_rank == 3
    # one flipped byte in the tensors: only the pinned sha256 sees it
    damaged = tmp_path / "a.safetensors"
    data = bytearray(spec.adapters["a"].file.read_bytes())
    data[-3] ^= 0x01
    damaged.write_bytes(bytes(data))
    tampered = replace(spec, adapters={"a": replace(spec.adapters["a"], file=damaged)})
    with pytest.raises(lora.AdapterError, match=str(damaged)):
        worker_adapters.read_all(tampered, T2I)
    # the DiT's adapter listed on the UNet model: its layers are not the UNet's
    other = tmp_path / "dit.safetensors"
    sha = _adapter_file(other, DIT)
    mismatched = replace(spec, adapters={"d": replace(spec.adapters["a"], file=other, sha256=sha)})
    with pytest.raises(lora.AdapterError, match=rf"{other}.*unknown layer.*adapter of t2i\?"):
        worker_adapters.read_all(mismatched, T2I)


def test_attach_makes_room_for_the_largest_set_and_apply_writes_only_changes(registry):
    spec = registry.models["t2i"]
    adapters = worker_adapters.read_all(spec, T2I)
    denoiser = worker_adapters._skeleton(T2I).to_empty(device="cpu")
    assert worker_adapters.attach(denoiser, adapters, spec.max_lora, torch.float32) == 3 + 2
    layer = next(m for m in denoiser.modules() if isinstance(m, lora.LoRALayer))
    worker_adapters.apply(denoiser, adapters, (("b", 0.5), ("a", 1.0)))
    assert torch.count_nonzero(layer.lora_scale) == 5
    layer.lora_scale.fill_(7.0)  # the same set again writes nothing
    worker_adapters.apply(denoiser, adapters, (("b", 0.5), ("a", 1.0)))
    assert bool((layer.lora_scale == 7.0).all())
    worker_adapters.apply(denoiser, adapters, ())
    assert torch.count_nonzero(layer.lora_scale) == 0
    assert worker_adapters.attach(denoiser, {}, 2, torch.float32) == 0


def test_a_denoiser_two_variants_share_is_attached_once_and_its_set_is_its_own(registry):
    """Two float variants of one dtype hold the same denoiser: the second attach keeps the
    branches (ungated when it compiles), and a set applied through one variant is what the
    other finds in place."""
    spec = registry.models["t2i"]
    adapters = worker_adapters.read_all(spec, T2I)
    shared = worker_adapters._skeleton(T2I).to_empty(device="cpu")
    worker_adapters.attach(shared, adapters, spec.max_lora, torch.float32, compiled=False)
    layers = [m for m in shared.modules() if isinstance(m, lora.LoRALayer)]
    assert worker_adapters.attach(shared, adapters, spec.max_lora, torch.float32, True) == 5
    assert [m for m in shared.modules() if isinstance(m, lora.LoRALayer)] == layers
    assert not any(m.gated for m in layers)
    worker_adapters.apply(shared, adapters, (("a", 1.0),))  # a job of the first variant
    worker_adapters.apply(shared, adapters, ())  # then one of the second, without adapters
    assert all(m.idle for m in layers) and torch.count_nonzero(layers[0].lora_scale) == 0


def test_eager_denoisers_skip_idle_branches_and_compiled_ones_never_do(registry):
    spec = registry.models["t2i"]
    adapters = worker_adapters.read_all(spec, T2I)
    only_b = {"b": adapters["b"]}
    for compiled in (False, True):
        denoiser = worker_adapters._skeleton(T2I).to_empty(device="cpu")
        worker_adapters.attach(denoiser, adapters, spec.max_lora, torch.float32, compiled)
        layers = [m for m in denoiser.modules() if isinstance(m, lora.LoRALayer)]
        assert all(m.gated is not compiled and m.idle for m in layers)
        worker_adapters.apply(denoiser, only_b, (("b", 0.5),))
        assert not any(m.idle for m in layers)  # a and b name the same layers
        worker_adapters.apply(denoiser, only_b, ())
        assert all(m.idle for m in layers)
    # an idle gated layer runs its base alone: the same output, and B is never read
    layer = layers[0]
    layer.gated, layer.lora_up = True, None
    x = torch.randn(2, layer.geometry.in_features)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)


def test_the_worker_reads_kohyas_ldm_naming_with_the_models_own_config(tmp_path):
    """SDXL's kohya files name UNet blocks as the original LDM code did (input_blocks.N.1):
    where N falls depends on layers_per_block, which the worker reads from the model folder."""
    skeleton = worker_adapters._skeleton(T2I)
    per_block = skeleton.config.layers_per_block
    target = skeleton.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    stem = f"lora_unet_input_blocks_{2 + per_block}_1_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "sgm.safetensors"
    save_file(
        {
            f"{stem}.lora_down.weight": torch.randn(2, target.in_features, generator=g),
            f"{stem}.lora_up.weight": torch.randn(target.out_features, 2, generator=g),
            f"{stem}.alpha": torch.tensor(1.0),
        },
        str(path),
    )
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    registry = tmp_path / "registry.toml"
    registry.write_text(
        f'[models.t2i]\nsource = "{T2I}"\n'
        f'[models.t2i.adapters.sgm]\nfile = "{path}"\nsha256 = "{sha}"\n'
    )
    adapters = worker_adapters.read_all(load_registry(registry).models["t2i"], T2I)
    layer = adapters["sgm"].layers["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert adapters["sgm"].layout == "kohya-sgm" and layer.scale == 0.5
