"""bench.cpu_gemm: its Markdown is its JSON, and every kernel it times computes the product."""

import json

import pytest
import torch

from bench import cpu_gemm
from quantization.backends import x86_kernels


def test_each_committed_markdown_is_rendered_from_its_json():
    files = sorted(cpu_gemm.RESULTS.glob("cpu-gemm-*.json"))
    assert files
    for json_file in files:
        record = json.loads(json_file.read_text())
        assert json_file.with_suffix(".md").read_text() == cpu_gemm.markdown(record)
        assert [r["shape"] for r in record["results"]] == list(cpu_gemm.SHAPES)
        for r in record["results"]:
            assert set(r["ms"]) == set(cpu_gemm.KERNELS) and r["over_fp32"]["fp32"] == 1


def test_the_kernels_timed_compute_the_layer_they_stand_for():
    calls = cpu_gemm.operands(16, 64, 32)
    assert set(calls) == set(cpu_gemm.KERNELS)
    fp32, bf16, upcast = calls["fp32"](), calls["bf16"](), calls["bf16-weight-fp32"]()
    assert fp32.shape == bf16.shape == upcast.shape == (16, 32)
    assert bf16.dtype == torch.bfloat16 and upcast.dtype == torch.float32
    assert torch.allclose(upcast, fp32, rtol=0.05, atol=0.5)
    # the int8 kernels: oneDNN's u8 x s8 with the zero point taken off, and s8 x s8, both exact
    g = torch.Generator().manual_seed(0)
    xq = torch.randint(0, x86_kernels.U8_MAX + 1, (16, 64), dtype=torch.uint8, generator=g)
    wq = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=g)
    zero = (x86_kernels.U8_MAX + 1) // 2
    got = x86_kernels.linear(xq, zero, wq, torch.ones(32))
    assert torch.equal(got, (xq.float() - zero) @ wq.float().T)
    assert calls["int_mm"]().dtype == torch.int32
    timed = calls["x86-u8s8"]()  # the call the bench times: the same kernel, its operands
    assert timed.shape == (16, 32) and timed.dtype == torch.float32


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--shapes", "nope"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        cpu_gemm.main(argv)
