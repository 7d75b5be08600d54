"""The x86 backend: oneDNN's int8 kernels compute what the quantization scheme says, leave
their inputs as they were, and refuse what they cannot do, naming the backend that can."""

import pytest
import torch
from torch import nn

from quantization.activations import InputRange
from quantization.backends import x86, x86_kernels
from quantization.plan import LayerPlan
from quantization.types import LayerSpec

W8A8 = LayerSpec("int8", "int8", None, "tensor")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.proj = nn.Linear(32, 24)

    def forward(self, x):
        h = self.conv(x)  # (b, 32, h, w)
        return self.proj(h.flatten(2).transpose(1, 2))  # tokens of 32 channels


def _fake_quant(x: torch.Tensor, scale, zero_point: int = 128) -> torch.Tensor:
    """uint8 around the zero point, as the backend quantizes its inputs, back to float: codes
    0..255, or on a CPU without VNNI 0..127 (the same range in half the codes)."""
    top = x86_kernels.U8_MAX
    scale, zero_point = scale * 255 / top, round(zero_point * top / 255)
    return (torch.clamp(torch.round(x / scale) + zero_point, 0, top) - zero_point) * scale


def _inputs():
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    absmax = {"conv": x.abs().max(), "proj": None}
    with torch.no_grad():
        h = Net().conv(x)
    absmax["proj"] = h.abs().max()
    return x, {n: InputRange(torch.stack([a])) for n, a in absmax.items()}


def test_int8_layers_compute_the_quantized_product_and_leave_inputs_alone():
    x, ranges = _inputs()
    fp = Net().eval()
    q = Net().eval()
    x86.quantize_layers(q, {"conv": W8A8, "proj": W8A8}, ranges)
    assert isinstance(q.conv, x86.Int8Conv2d) and isinstance(q.proj, x86.Int8Linear)
    before = x.clone()
    with torch.no_grad():
        out = q(x)
        # the same scheme in float: int8 weights per output channel, u8 inputs per tensor
        h = nn.functional.conv2d(
            _fake_quant(x, float(q.conv.input_scale)),
            q.conv.dequantized_weight(),
            q.conv.bias,
            padding=1,
        )
        tokens = h.flatten(2).transpose(1, 2)
        ref = nn.functional.linear(
            _fake_quant(tokens, float(q.proj.input_scale)), q.proj.dequantized_weight(), q.proj.bias
        )
        full = fp(x)
    assert torch.equal(x, before)  # oneDNN's kernels never write into the caller's tensor

    def db(a, b):
        return float(10 * torch.log10(a.pow(2).mean() / (a - b).pow(2).mean()))

    assert db(ref, out) > 50  # the kernels compute the scheme (int32 accumulation)
    assert db(full, out) > 25  # and the scheme is close to float
    assert x86.nbytes(q.proj) < sum(p.numel() * 4 for p in fp.proj.parameters())


def test_a_one_sided_input_range_gets_an_asymmetric_scale_and_loses_less():
    """A SiLU output spans [-0.28, max]: a zero point near 0 spends every code on it."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = nn.functional.silu(torch.randn(256, 64) * 3)
    low, high = x.min(), x.max()
    sym, asym = nn.Sequential(nn.Linear(64, 32)), nn.Sequential(nn.Linear(64, 32))
    for holder in (sym, asym):
        holder[0].load_state_dict(layer.state_dict())
    x86.quantize_layers(sym, {"0": W8A8}, {"0": InputRange(torch.stack([x.abs().max()]))})
    ranged = InputRange(torch.stack([x.abs().max()]), low=low.reshape(1), high=high.reshape(1))
    x86.quantize_layers(asym, {"0": W8A8}, {"0": ranged})
    q = asym[0]
    assert int(sym[0].input_zero_point) == 128 and 0 < int(q.input_zero_point) < 20
    assert sym[0].zero_point == round(128 * x86_kernels.U8_MAX / 255)  # in this CPU's codes
    with torch.no_grad():
        fake = _fake_quant(x, float(q.input_scale), int(q.input_zero_point))
        ref = nn.functional.linear(fake, q.dequantized_weight(), q.bias)
        full, out_sym, out_asym = layer(x), sym(x), asym(x)

    def db(a, b):
        return float(10 * torch.log10(a.pow(2).mean() / (a - b).pow(2).mean()))

    assert db(ref, out_asym) > 50  # the kernel takes the zero point as the scheme says
    assert db(full, out_asym) > db(full, out_sym) + 3


def test_per_token_activations_quantize_each_row_by_its_own_scale():
    torch.manual_seed(0)
    layer = nn.Linear(32, 24)
    x = torch.randn(5, 7, 32) * torch.logspace(-2, 1, 7)[None, :, None]  # rows far apart
    holder = nn.Sequential(layer)
    token = LayerSpec("int8", "int8", None, "token")
    x86.quantize_layers(holder, {"0": token}, {})
    q = holder[0]
    assert isinstance(q, x86.Int8Linear) and not hasattr(q, "input_scale")
    with torch.no_grad():
        out = q(x)
        fake = _fake_quant(x, x.abs().amax(-1, keepdim=True) / 127)
        ref = nn.functional.linear(fake, q.dequantized_weight(), q.bias)
    err = float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))
    assert err > 50
    conv = nn.Sequential(nn.Conv2d(4, 4, 3))
    x86.quantize_layers(conv, {"0": token}, {})  # no tokens in NCHW: dynamic per tensor
    image = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        y = conv(image)
        s = float(image.abs().max()) / 127
        weight, bias = conv[0].dequantized_weight(), conv[0].bias
        ref = nn.functional.conv2d(_fake_quant(image, s), weight, bias)
    assert float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean())) > 50


def test_a_reloaded_state_gives_the_same_outputs():
    x, ranges = _inputs()
    q = Net().eval()
    x86.quantize_layers(q, {"conv": W8A8, "proj": LayerSpec("int8")}, ranges)
    tensors, meta = x86.state_dict(q)
    fresh = Net().eval()
    x86.prepare(
        fresh,
        {
            "conv": LayerPlan("int8", "int8", None, "tensor", "conv"),
            "proj": LayerPlan("int8", None, None, None, "proj"),
        },
    )
    x86.load_state(fresh, tensors, meta)
    with torch.no_grad():
        assert torch.equal(q(x), fresh(x))
    with pytest.raises(KeyError, match="missing"):
        x86.load_state(fresh, {k: v for k, v in tensors.items() if "bias" not in k}, meta)


@pytest.mark.parametrize("hardware_bf16", [True, False])
def test_bf16_layers_weigh_half_compute_as_the_cpu_can_and_reload(monkeypatch, hardware_bf16):
    """With bf16 in hardware the product is bf16's; without, the same bf16 weights are cast to
    float32 at each call and the product is float32's (``x86_kernels.NATIVE_BF16``)."""
    monkeypatch.setattr(x86._Bf16Layer, "hardware_bf16", hardware_bf16)
    x, ranges = _inputs()
    fp, q = Net().eval(), Net().eval()
    bf16 = LayerSpec("bf16")
    assert bf16.level == "bf16" and bf16.granularity is None
    x86.quantize_layers(q, {"conv": bf16, "proj": bf16}, ranges)
    assert isinstance(q.conv, x86.Bf16Conv2d) and isinstance(q.proj, x86.Bf16Linear)
    assert x86.layer_specs(q) == {"conv": bf16, "proj": bf16}
    # half the float bytes: weights and biases in bf16, whichever way they are multiplied
    assert x86.nbytes(q) * 2 == sum(p.numel() * p.element_size() for p in fp.parameters())
    assert q.conv.weight.dtype == q.proj.weight.dtype == torch.bfloat16
    before = x.clone()
    compute = torch.bfloat16 if hardware_bf16 else torch.float32

    def rounded(t: torch.Tensor) -> torch.Tensor:  # the stored weight, in the compute dtype
        return t.bfloat16().to(compute)

    with torch.no_grad():
        want, got = fp(x), q(x)
        h = torch.nn.functional.conv2d(
            x.to(compute), rounded(fp.conv.weight), rounded(fp.conv.bias), padding=1
        )
        if hardware_bf16:  # the bf16 output is cast back to float32, then the next layer's
            h = h.float().to(compute)  # input to bf16 again
        by_hand = torch.nn.functional.linear(
            h.flatten(2).transpose(1, 2), rounded(fp.proj.weight), rounded(fp.proj.bias)
        )
    assert got.dtype == torch.float32 and torch.equal(x, before)
    if hardware_bf16:
        assert torch.allclose(got, by_hand.float(), atol=1e-2)
    else:
        assert torch.equal(got, by_hand)
    error = (got - want).pow(2).mean() / want.pow(2).mean()
    assert 30 < -10 * torch.log10(error) < 70  # bf16's rounding, not float, not garbage
    tensors, meta = x86.state_dict(q)
    fresh = Net().eval()
    x86.prepare(
        fresh,
        {n: LayerPlan("bf16", None, None, None, n) for n in ("conv", "proj")},
    )
    x86.load_state(fresh, tensors, meta)
    with torch.no_grad():
        assert torch.equal(q(x), fresh(x))
    with pytest.raises(ValueError, match="no quantized activations"):
        LayerSpec("bf16", "int8")


@pytest.mark.parametrize(
    ("spec", "device", "names"),
    [
        (LayerSpec("int4", None, 128), "cpu", "quanto"),
        (W8A8, "cuda", "CPU kernels"),
        (LayerSpec("bf16"), "cuda", "CPU kernels"),
    ],
)
def test_what_it_cannot_do_is_refused_naming_what_can(spec, device, names):
    with pytest.raises(ValueError, match=names):
        x86.check(spec, device)


def test_a_pipeline_quantizes_with_scales_per_timestep_range_and_reloads(tmp_path):
    """Through quantize() (probe, plan of work, calibration, check) and load_quantized."""
    from quantization import QuantizeOptions, load_quantized, quantize
    from quantization.calibration import Conditions
    from tests import tiny

    options = QuantizeOptions(
        num_inference_steps=3,
        guidance_scale=2.0,
        conditions=Conditions("classes", (0, 1, 2, 3), "--classes"),
        calibration_prompts=4,
        check_images=2,
        backend="x86",
        granularity="timestep",
    )
    result = quantize(tiny.dit_pipeline(), "w8a8-static", options=options, source="tiny")
    assert {lp.granularity for lp in result.plan.values() if lp.activations} == {"timestep"}
    assert result.measured["sqnr_latent_db"] > 10
    result.save(tmp_path)
    loaded = load_quantized(tmp_path).transformer
    layer = loaded.get_submodule("transformer_blocks.0.ff.net.2")
    assert isinstance(layer, x86.Int8Linear) and layer.range_scales.numel() > 1


def test_a_compiled_denoiser_as_served_matches_eager_and_leaves_its_inputs_alone(tmp_path):
    """load_quantized(path, compile=True), the call a worker makes: the int8 kernels are custom
    ops Inductor calls as they are, with the quantizing of their inputs fused before them."""
    from quantization import QuantizeOptions, load_quantized, quantize
    from quantization.calibration import Conditions
    from tests import tiny

    options = QuantizeOptions(
        num_inference_steps=2,
        guidance_scale=2.0,
        conditions=Conditions("classes", (0, 1), "--classes"),
        calibration_prompts=2,
        check_images=1,
        backend="x86",
        granularity="timestep",
    )
    quantize(tiny.dit_pipeline(), "w8a8-static", options=options, source="tiny").save(tmp_path)
    eager = load_quantized(tmp_path).transformer
    compiled = load_quantized(tmp_path, compile=True).transformer
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([900, 900]), torch.tensor([1, 2])
    before = x.clone()
    with torch.no_grad():
        ref = eager(x, timestep=t, class_labels=labels).sample
        out = compiled(x, timestep=t, class_labels=labels).sample
        late = compiled(x, timestep=torch.tensor([50, 50]), class_labels=labels).sample
    assert torch.equal(x, before)
    assert float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())) > 40
    with torch.no_grad():  # the range's scales follow the timestep in the compiled graph too
        assert torch.allclose(
            late,
            eager(x, timestep=torch.tensor([50, 50]), class_labels=labels).sample,
            atol=1e-3 * float(late.abs().max()),
        )


def test_without_vnni_inputs_take_7_bit_codes_and_the_kernels_stay_exact(monkeypatch):
    """What a CPU without VNNI runs (any CPU can: 7-bit codes never saturate oneDNN's int16
    pair sums): static, asymmetric and per-token inputs in codes 0..127 around a zero point
    halved, at twice the scale, computed as the scheme says."""
    monkeypatch.setattr(x86_kernels, "U8_MAX", 127)
    x, ranges = _inputs()
    q = Net().eval()
    x86.quantize_layers(q, {"conv": W8A8, "proj": LayerSpec("int8", "int8", None, "token")}, ranges)
    assert q.conv.zero_point == 64 and int(q.conv.input_zero_point) == 128  # artifact unchanged
    with torch.no_grad():
        out = q(x)
        h = nn.functional.conv2d(
            _fake_quant(x, float(q.conv.input_scale)), q.conv.dequantized_weight(), q.conv.bias,
            padding=1,
        )  # fmt: skip
        tokens = q.conv(x).flatten(2).transpose(1, 2)
        ref = nn.functional.linear(
            _fake_quant(tokens, tokens.abs().amax(-1, keepdim=True) / 127),
            q.proj.dequantized_weight(),
            q.proj.bias,
        )
        conv_out, full = q.conv(x), Net().eval()(x)

    def db(a, b):
        return float(10 * torch.log10(a.pow(2).mean() / (a - b).pow(2).mean()))

    assert db(h, conv_out) > 50 and db(ref, out) > 50
    assert db(full, out) > 20  # a bit fewer codes: still close to float
