"""bench.x86_bf16: its Markdown is its JSON, and it switches every bf16 layer of one copy alone."""

import json

import torch

from bench import x86_bf16
from quantization.artifact import load_quantized_denoiser
from quantization.backends import x86


def test_the_committed_markdown_is_rendered_from_the_committed_json():
    files = sorted(x86_bf16.RESULTS.glob("x86-bf16-*.json"))
    assert files
    for json_file in files:
        record = json.loads(json_file.read_text())
        assert json_file.with_suffix(".md").read_text() == x86_bf16.markdown(record)
        assert {(r["bf16_layers_in"], r["run"]) for r in record["rows"]} == {
            (m, run) for m in x86_bf16.MODES for run in ("eager", "compiled")
        }


def test_set_mode_switches_one_copys_bf16_layers_and_both_compute_the_layer():
    _, one = load_quantized_denoiser(x86_bf16.DEFAULT_ARTIFACT)
    _, two = load_quantized_denoiser(x86_bf16.DEFAULT_ARTIFACT)
    count = x86_bf16.set_mode(one, "bf16")
    assert count > 0 and x86_bf16.set_mode(two, "float32") == count
    assert all(layer.hardware_bf16 for layer in x86_bf16.bf16_layers(one))
    assert not any(layer.hardware_bf16 for layer in x86_bf16.bf16_layers(two))
    assert x86._Bf16Layer.hardware_bf16 is x86.kernels.NATIVE_BF16  # the default untouched
    a, b = x86_bf16.bf16_layers(one)[0], x86_bf16.bf16_layers(two)[0]
    assert isinstance(a, x86.Bf16Linear | x86.Bf16Conv2d)
    shape = (2, a.in_features) if isinstance(a, x86.Bf16Linear) else (2, a.in_channels, 8, 8)
    x = torch.randn(shape)
    with torch.no_grad():
        in_bf16, in_float = a(x), b(x)
    assert in_bf16.dtype == in_float.dtype == torch.float32
    assert not torch.equal(in_bf16, in_float)  # the input rounded to bf16 in one only
    assert torch.allclose(in_bf16, in_float, rtol=0.05, atol=0.05)
