"""LoRA beside the base layers: files in both layouts read to the same adapter, mismatched or
damaged files are refused naming the file and key, the branch adds exactly s·B(A x) on float
and quantized layers without touching their weights, and a compiled denoiser switches
adapters without recompiling."""

import copy
import hashlib
import json

import pytest
import torch
import torch._dynamo.testing
from safetensors.torch import save_file
from torch import nn

from pipelines import lora
from tests import tiny

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0"
LINEAR = [f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_k", f"{ATTN}.ff.net.2", "time_embedding.linear_1"]
CONV = [
    "down_blocks.0.resnets.0.conv1",  # 3×3, padding 1
    "down_blocks.0.downsamplers.0.conv",  # 3×3, stride 2
    "down_blocks.1.attentions.0.proj_in",  # 1×1
    "down_blocks.1.resnets.0.conv_shortcut",
]


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    weight = model.get_submodule(name).weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _pairs(model: nn.Module, names, rank: int, seed: int) -> dict[str, tuple]:
    """Random A, B for the named layers of ``model`` (conv: A with the layer's kernel, B 1×1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        w = _weight(model, name)
        a = torch.randn(rank, *w.shape[1:], generator=g) / w.shape[1] ** 0.5
        b = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.1
        out[name] = (a, b)
    return out


def _write_peft(path, pairs, prefix="unet.", alpha=None, metadata=None):
    tensors = {}
    for name, (a, b) in pairs.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = a.clone()
        tensors[f"{prefix}{name}.lora_B.weight"] = b.clone()
        if alpha is not None:
            tensors[f"{prefix}{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path), metadata=metadata)
    return path


def _write_kohya(path, pairs, alpha):
    tensors = {}
    for name, (a, b) in pairs.items():
        stem = "lora_unet_" + name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = a
        tensors[f"{stem}.lora_up.weight"] = b
        tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


def _merged(model: nn.Module, adapters) -> nn.Module:
    """A copy of a float model with W + s · alpha/r · B A in its weights."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for adapter, scale in adapters:
            for name, layer in adapter.layers.items():
                w = _weight(merged, name)
                a, b = layer.down.double(), layer.up.double()
                # a 1×1 conv after a conv: one conv of kernel B A
                delta = b @ a if w.dim() == 2 else torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
                w.copy_((w.double() + scale * layer.scale * delta).float())
    return merged


def _unet_call():
    call = tiny.calls("unet", steps=(500,), batch=2)[0]
    return call.args, call.kwargs


def _run(model, call):
    with torch.no_grad():
        return model(*call[0], **call[1]).sample


@pytest.mark.parametrize("build", [tiny.sd_unet, tiny.dit, tiny.pixart])
def test_kohya_stems_name_every_linear_and_conv_of_the_tiny_denoisers(build):
    names = [n for n, m in build().named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]
    assert len(names) > 20
    assert [lora.kohya_name(n.replace(".", "_")) for n in names] == names


def test_peft_and_kohya_files_read_to_the_same_adapter(tmp_path):
    unet = tiny.sd_unet()
    pairs = _pairs(unet, LINEAR + CONV, rank=4, seed=0)
    meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 2, "unet.r": 4})}
    peft = lora.read(_write_peft(tmp_path / "style.safetensors", pairs, metadata=meta))
    kohya = lora.read(_write_kohya(tmp_path / "k.safetensors", pairs, alpha=2), name="kohya")
    assert (peft.name, peft.layout, kohya.name, kohya.layout) == ("style", "peft", "kohya", "kohya")
    assert peft.sha256 == hashlib.sha256((tmp_path / "style.safetensors").read_bytes()).hexdigest()
    assert sorted(peft.layers) == sorted(kohya.layers) == sorted(LINEAR + CONV)
    for name, (a, b) in pairs.items():
        for adapter in (peft, kohya):
            layer = adapter.layers[name]
            assert torch.equal(layer.down, a) and torch.equal(layer.up, b)
            assert (layer.rank, layer.scale) == (4, 0.5)
    lora.check(peft, unet)
    lora.check(kohya, unet)
    # no alpha anywhere: alpha = rank (scale 1), as diffusers loads such a file
    plain = lora.read(_write_peft(tmp_path / "plain.safetensors", pairs))
    assert {layer.scale for layer in plain.layers.values()} == {1.0}


def test_transformer_files_fit_dit_and_pixart(tmp_path):
    for build in (tiny.dit, tiny.pixart):
        model = build()
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
        names.append("pos_embed.proj")  # the patch embedding: a Conv2d with stride 2
        path = tmp_path / f"{build.__name__}.safetensors"
        adapter = lora.read(
            _write_peft(path, _pairs(model, names, 2, 1), "transformer.", metadata={"rank": "2"})
        )
        lora.check(adapter, model)
        with pytest.raises(lora.AdapterError, match="unknown layer"):
            lora.check(adapter, tiny.sd_unet())


def test_mismatched_files_are_refused_naming_the_file_and_the_first_offending_key(tmp_path):
    unet = tiny.sd_unet()
    pairs = _pairs(unet, LINEAR + CONV, rank=4, seed=0)
    path = tmp_path / "other.safetensors"

    def refused(pairs, match, where="check"):
        _write_peft(path, pairs)
        with pytest.raises(lora.AdapterError, match=match) as e:
            lora.check(lora.read(path), unet)
        assert str(path) in str(e.value)
        return str(e.value)

    a, b = pairs[LINEAR[1]]  # attn2.to_k: 32 inputs
    wide = dict(pairs) | {LINEAR[1]: (torch.randn(4, 64), b)}
    msg = refused(wide, r"shape mismatch .*A expected \(4, 32\), got \(4, 64\)")
    assert f"unet.{LINEAR[1]}" in msg  # the key as the file spells it
    refused(pairs | {"down_blocks.9.conv": pairs[CONV[0]]}, "unknown layer down_blocks.9.conv")
    refused({f"{ATTN}.norm1": (a, b)}, "is a LayerNorm, not a Linear")
    refused({LINEAR[1]: (a, torch.randn(64, 3))}, "rank mismatch between A and B")
    flat = {CONV[0]: (pairs[CONV[0]][0], pairs[CONV[0]][1].flatten(1))}
    refused(flat, "2-D .* or 4-D")
    # the first offending key in the file's order is the one named
    msg = refused(pairs | {"a.missing": (a, b), "b.missing": (a, b)}, "a.missing")
    assert "b.missing" not in msg
    save_file({"unet.x.lora_A.weight": a}, str(path))
    with pytest.raises(lora.AdapterError, match="B matrix is missing"):
        lora.read(path)
    save_file({"text_encoder.x.lora_A.weight": a, "text_encoder.x.lora_B.weight": b}, str(path))
    with pytest.raises(lora.AdapterError, match="text-encoder LoRA is not supported"):
        lora.read(path)


def test_a_damaged_file_is_refused_naming_it(tmp_path):
    unet = tiny.sd_unet()
    path = _write_peft(tmp_path / "style.safetensors", _pairs(unet, LINEAR, 4, 0))
    good = path.read_bytes()
    digest = lora.read(path).sha256
    header_size = int.from_bytes(good[:8], "little")
    for offset in (0, 8, 8 + header_size // 2):  # its length, the JSON's first brace, a key
        data = bytearray(good)
        data[offset] ^= 0x40
        path.write_bytes(bytes(data))
        with pytest.raises(lora.AdapterError, match=r"style\.safetensors") as e:
            lora.check(lora.read(path), unet)
        assert "not a valid safetensors file" in str(e.value)
    data = bytearray(good)
    data[-3] ^= 0x01  # a tensor byte: only the sha256 the registry pins can tell
    path.write_bytes(bytes(data))
    with pytest.raises(lora.AdapterError, match=f"style.safetensors: sha256 .* expects {digest}"):
        lora.read(path, sha256=digest)
    with pytest.raises(lora.AdapterError, match="cannot read"):
        lora.read(tmp_path / "absent.safetensors")


@pytest.mark.parametrize(
    ("build", "kind"), [(tiny.sd_unet, "unet"), (tiny.dit, "dit"), (tiny.pixart, "pixart")]
)
def test_no_adapter_gives_the_base_output_bit_for_bit(build, kind):
    model = build()
    first = tiny.calls(kind, steps=(500,), batch=2)[0]
    call = (first.args, first.kwargs)
    want = _run(model, call)
    targets = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert targets == lora.targets(model)
    keys = set(model.state_dict())
    assert lora.attach(model, 8, targets) == sorted(targets)
    assert torch.equal(_run(model, call), want)  # zero buffers as attached
    assert {k.replace(".base.", ".") for k in model.state_dict()} == keys  # no LoRA state
    lora.detach(model)
    assert set(model.state_dict()) == keys and torch.equal(_run(model, call), want)


def test_stacked_adapters_equal_their_merged_weights_on_fp32(tmp_path):
    unet = tiny.sd_unet()
    call = _unet_call()
    base = _run(unet, call)
    pairs_a = _pairs(unet, LINEAR + CONV, rank=4, seed=0)
    a = lora.read(_write_peft(tmp_path / "a.safetensors", pairs_a, alpha=8))
    b = lora.read(_write_kohya(tmp_path / "b.safetensors", _pairs(unet, CONV[1:], 3, 2), 1))
    adapters = [(a, 0.8), (b, -1.5)]
    want = _run(_merged(unet, adapters), call)
    lora.attach(unet, max_rank=7, targets=LINEAR + CONV)
    lora.set_adapters(unet, adapters)
    got = _run(unet, call)
    assert (want - base).abs().max() > 1e-2  # the adapters do change the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # more ranks than attached: refused, and the set in place stays
    with pytest.raises(
        lora.AdapterError, match=r"b.safetensors: .* add up to 10, more than max_rank 7"
    ):
        lora.set_adapters(unet, [(a, 1.0), (b, 1.0), (b, 1.0)])
    assert torch.equal(_run(unet, call), got)
    lora.set_adapters(unet, [])
    assert torch.equal(_run(unet, call), base)
    lora.set_adapters(unet, [(a, 0.8)])
    torch.testing.assert_close(
        _run(unet, call), _run(_merged(tiny.sd_unet(), [(a, 0.8)]), call), rtol=1e-4, atol=1e-4
    )


def test_a_compiled_denoiser_switches_adapters_without_recompiling(tmp_path):
    unet = tiny.sd_unet()
    call = _unet_call()
    adapters = [
        lora.read(_write_peft(tmp_path / f"{i}.safetensors", _pairs(unet, LINEAR + CONV, 4, i)))
        for i in range(2)
    ]
    targets = LINEAR + CONV
    lora.attach(unet, 8, targets)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(unet, backend=counter)
    torch._dynamo.utils.counters.clear()
    for active in ([], [(adapters[0], 1.0)], [(adapters[1], 0.5), (adapters[0], 1.0)], []):
        lora.set_adapters(unet, active)
        eager = _run(unet, call)
        torch.testing.assert_close(_run(compiled, call), eager, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    assert not torch._dynamo.utils.counters["recompiles"]


def test_x86_int8_layers_compiled_by_inductor_switch_without_recompiling():
    """Inductor (as a worker compiles, no freezing) reads the buffers at every call."""
    from quantization.activations import InputRange
    from quantization.backends import x86
    from quantization.types import LayerSpec

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(2), nn.Identity())
    x = torch.randn(2, 8, 6, 6)
    w8a8 = LayerSpec("int8", "int8", None, "tensor")
    x86.quantize_layers(net, {"0": w8a8}, {"0": InputRange(x.abs().max().reshape(1))})
    lora.attach(net, 4, ["0"])
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(net, backend=counter)
    g = torch.Generator().manual_seed(0)
    outs = []
    for rank in (0, 2, 4):
        layer = lora.LayerLoRA(
            "k",
            torch.randn(rank, 8, 3, 3, generator=g),
            torch.randn(16, rank, 1, 1, generator=g),
            float(rank or 1),
        )
        adapter = lora.Adapter("r", "r.safetensors", "0", "peft", {"0": layer} if rank else {})
        lora.set_adapters(net, [(adapter, 0.7)])
        with torch.no_grad():
            got, want = compiled(x), net(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        outs.append(got)
    assert counter.frame_count == 1
    assert not torch.allclose(outs[1], outs[2])


def _layer_bytes(backend, model, names) -> dict[str, str]:
    """sha256 of every saved tensor of the named layers, as the backend saves the model (a
    wrapped layer's keys read as the bare layer's)."""
    tensors, _ = backend.state_dict(model)
    out = {}
    for key, t in tensors.items():
        key = key.replace(".base.", ".")
        if any(key.startswith(f"{n}.") for n in names):
            raw = t.detach().contiguous().cpu().flatten().view(torch.uint8).numpy().tobytes()
            out[key] = hashlib.sha256(raw).hexdigest()
    assert all(any(k.startswith(f"{n}.") for k in out) for n in names)
    return out


@pytest.mark.parametrize("backend_name", ["quanto", "x86", "torchao"])
def test_on_quantized_layers_the_branch_adds_exactly_its_float_delta(tmp_path, backend_name):
    from quantization import backends
    from quantization.activations import collect_stats, ranges_for
    from quantization.types import LayerSpec

    backend = backends.get(backend_name)
    unet, fp = tiny.sd_unet(), tiny.sd_unet()
    calls = tiny.calls("unet", batch=2)
    quantized = LINEAR[:3] + ([] if backend_name == "torchao" else CONV)  # torchao: Linear only
    specs = {n: LayerSpec("int8", "int8", None, "tensor") for n in quantized}
    stats = collect_stats(unet, quantized, calls)
    smoothing = {LINEAR[0]: stats.channel_absmax(LINEAR[0]).clamp(min=1e-3) ** 0.5}
    backend.quantize_layers(unet, specs, ranges_for(stats, specs, smoothing), smoothing)
    assert all(backend.is_quantized(unet.get_submodule(n)) for n in quantized)
    before = _layer_bytes(backend, unet, quantized)

    adapter = lora.read(_write_peft(tmp_path / "s.safetensors", _pairs(fp, LINEAR + CONV, 4, 3)))
    lora.attach(unet, 4, LINEAR + CONV)
    lora.attach(fp, 4, LINEAR + CONV)
    seen: dict[str, tuple] = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = (args[0].detach().clone(), output.detach().clone())

        return hook

    for name in LINEAR + CONV:
        unet.get_submodule(name).register_forward_hook(keep(name))
    call = (calls[1].args, calls[1].kwargs)
    lora.set_adapters(unet, [(adapter, 0.9)])
    lora.set_adapters(fp, [(adapter, 0.9)])
    q_out, fp_out = _run(unet, call), _run(fp, call)
    assert _layer_bytes(backend, unet, quantized) == before  # base weights untouched
    for name in LINEAR + CONV:
        x, y = seen[name]
        wrapped = unet.get_submodule(name)
        with torch.no_grad():
            base_y = wrapped.base(x)  # the layer alone, as quantized (smoothing hook included)
            layer = adapter.layers[name]
            if layer.down.dim() == 2:
                delta = x @ layer.down.T @ layer.up.T
            else:
                g = wrapped.geometry
                h = nn.functional.conv2d(x, layer.down, None, g.stride, g.padding, g.dilation)
                delta = nn.functional.conv2d(h, layer.up)
        expected = base_y + 0.9 * layer.scale * delta
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * float(y.abs().max()))
        assert (y - base_y).abs().max() > 1e-3  # the branch did add something
    # quantized + LoRA stays near FP + LoRA (the quantization noise, not a lost branch)
    err = (q_out - fp_out).pow(2).mean() / fp_out.pow(2).mean()
    assert float(-10 * torch.log10(err)) > 20
