"""A worker's variants under a memory budget (app.worker.residency), the registry's worker
tables, and components shared by identity. Unit tier: loads are plain functions holding
fake modules of known size; the real loading is in tests/service/test_residency_service.py."""

from __future__ import annotations

import pytest
import torch

from app import metrics
from app.registry import RegistryError, load_registry, parse_bytes
from app.worker.components import Components, Identity, estimate_bytes, module_bytes
from app.worker.residency import LoadFailed, Residency, Slot

ENCODER = Identity("m", "text_encoder", "fp32", "cpu")


def _variant(components: Components, name: str, size: int, log: list[str], fail=None) -> Slot:
    """A slot whose load holds a shared 10-byte encoder and its own ``size``-byte denoiser."""
    key = ("m", name)
    user = f"m/{name}"
    own = Identity(f"artifact-{name}", "unet", "fp32", "cpu")

    def load() -> str:
        log.append(name)
        if fail is not None:
            raise fail
        components.hold(ENCODER, torch.nn.Linear(1, 2, bias=False).requires_grad_(False), user)
        components.hold(own, torch.nn.Linear(size // 4, 1, bias=False), user)
        return f"pipeline of {name}"

    def needs() -> int:
        held = components.bytes()
        return size + (0 if ENCODER in held else 8)

    return Slot(key, load, needs)


def _count(counter, **labels) -> float:
    return counter.labels(**labels)._value.get()


def test_least_recently_used_is_evicted_beyond_the_budget_and_pinned_never():
    components = Components()
    changes = []
    residency = Residency(components, budget=8 + 2 * 400, pinned=frozenset({("m", "pin")}))
    residency.on_change = lambda key, loaded: changes.append((key[1], loaded is not None))
    log: list[str] = []
    slots = {n: _variant(components, n, 400, log) for n in ("pin", "a", "b")}
    evicted_before = _count(metrics.EVICTIONS, model="m", variant="a")
    assert residency.get(slots["pin"]) == "pipeline of pin"
    residency.get(slots["a"])
    assert components.total() == 8 + 800
    residency.get(slots["b"])  # a is the least recently used not pinned
    assert list(residency.resident) == [("m", "pin"), ("m", "b")]
    assert _count(metrics.EVICTIONS, model="m", variant="a") == evicted_before + 1
    residency.get(slots["pin"])
    residency.get(slots["a"])  # b goes, pin stays although it was used before b
    assert list(residency.resident) == [("m", "pin"), ("m", "a")]
    assert log == ["pin", "a", "b", "a"]
    assert components.total() == 8 + 800  # the shared encoder is held once
    assert ("a", False) in changes and ("b", False) in changes


def test_a_shared_component_goes_with_its_last_user():
    components = Components()
    residency = Residency(components)
    log: list[str] = []
    a, b = (_variant(components, n, 40, log) for n in ("a", "b"))
    residency.get(a)
    residency.get(b)
    assert components.users(ENCODER) == {"m/a", "m/b"}
    residency.evict(("m", "a"))
    assert components.users(ENCODER) == {"m/b"}
    residency.evict(("m", "b"))
    assert components.total() == 0


def test_a_failed_load_fails_with_its_reason_until_the_retry_time_and_others_go_on():
    components = Components()
    residency = Residency(components)
    log: list[str] = []
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    broken = _variant(components, "broken", 40, log, fail=oom)
    with pytest.raises(LoadFailed, match="out of memory") as first:
        residency.get(broken)
    assert first.value.code == "out_of_memory"
    with pytest.raises(LoadFailed, match="out of memory"):
        residency.get(broken)
    assert log == ["broken"]  # not tried again before RETRY_FAILED_S
    residency.failures[("m", "broken")].until = 0.0
    with pytest.raises(LoadFailed):
        residency.get(broken)
    assert log == ["broken", "broken"]
    corrupt = _variant(components, "corrupt", 40, log, fail=ValueError("sha256 mismatch"))
    with pytest.raises(LoadFailed, match="ValueError: sha256 mismatch") as second:
        residency.get(corrupt)
    assert second.value.code == "load_failed"
    assert residency.get(_variant(components, "fine", 40, log)) == "pipeline of fine"


def test_a_variant_larger_than_the_budget_is_refused_without_evicting_pinned_ones():
    components = Components()
    residency = Residency(components, budget=500, pinned=frozenset({("m", "pin")}))
    log: list[str] = []
    residency.get(_variant(components, "pin", 400, log))
    with pytest.raises(LoadFailed, match="budget is 500") as refused:
        residency.get(_variant(components, "big", 400, log))
    assert refused.value.code == "over_budget"
    assert list(residency.resident) == [("m", "pin")] and log == ["pin"]


def test_module_bytes_count_parameters_and_buffers():
    model = torch.nn.BatchNorm1d(3)  # weight, bias: 3 floats; running stats: 6 floats + 1 long
    assert module_bytes(model) == 4 * (3 + 3 + 3 + 3) + 8
    assert module_bytes("a tokenizer") == 0
    shared = torch.nn.Linear(4, 4, bias=False)
    tied = torch.nn.ModuleDict({"embed": shared, "head": torch.nn.Linear(4, 4, bias=False)})
    tied["head"].weight = shared.weight  # one tensor under two names
    assert module_bytes(tied) == 4 * 16


def test_estimates_are_read_from_safetensors_headers(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {"w": torch.zeros(10, 4), "step": torch.zeros(3, dtype=torch.int64)},
        tmp_path / "a.safetensors",
    )
    assert estimate_bytes(tmp_path, "fp32") == 40 * 4 + 3 * 8
    assert estimate_bytes(tmp_path, "bf16") == 40 * 2 + 3 * 8
    assert estimate_bytes(tmp_path / "missing", "fp32") is None


REGISTRY = """
[models.a]
source = "{a}"
[models.a.variants.fp32]
dtype = "fp32"
[models.a.variants.half]
dtype = "bf16"
[models.b]
source = "{b}"
device = "cuda"
[models.b.variants.fp32]
dtype = "fp32"
"""


def _registry(tmp_path, workers: str = ""):
    for name in ("a", "b"):
        (tmp_path / name).mkdir(exist_ok=True)
    path = tmp_path / "registry.toml"
    path.write_text(REGISTRY.format(a=tmp_path / "a", b=tmp_path / "b") + workers)
    return load_registry(path)


def test_without_worker_tables_each_device_gets_one_worker_with_all_its_variants(tmp_path):
    registry = _registry(tmp_path)
    assert {n: w.variants for n, w in registry.workers.items()} == {
        "cpu": (("a", "fp32"), ("a", "half")),
        "cuda": (("b", "fp32"),),
    }
    assert registry.workers["cpu"].memory_budget is None


def test_worker_tables_pick_variants_by_pattern_with_a_budget_and_pins(tmp_path):
    registry = _registry(
        tmp_path,
        '[workers.small]\nvariants = ["a/*"]\nmemory_budget = "1.5 GiB"\npin = ["a/half"]\n',
    )
    small = registry.workers["small"]
    assert small.variants == (("a", "fp32"), ("a", "half"))
    assert small.memory_budget == 3 * 2**29 and small.pinned == {("a", "half")}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('variants = ["c/*"]', "workers.w: variants: 'c/\\*' names no variant"),
        ('variants = ["b/fp32"]', "b/fp32 runs on cuda, not cpu"),
        ('memory_budget = "lots"', "workers.w.memory_budget: 'lots' is not a size"),
        ('pin = ["a"]', "'a' is not \"MODEL/VARIANT\""),
        ("replicas = 2", "workers.w.replicas: not a key of this table"),
        ('variants = "a/*"', "workers.w.variants: Input should be a valid list"),
    ],
)
def test_a_bad_worker_table_is_refused_naming_it(tmp_path, table, message):
    with pytest.raises(RegistryError, match=message):
        _registry(tmp_path, f"[workers.w]\n{table}\n")


def test_sizes_read_with_units():
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("800 MB") == 800 * 10**6
    assert parse_bytes(1000) == 1000
    for bad in ("-1", 0, "2 GB per worker", True):
        with pytest.raises(ValueError):
            parse_bytes(bad)
