"""Kernel ops (quant/kernels/ops.py) and backend registration (quant/kernels/registry.py)."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from torch_caps import has_cpu_scaled_mm

import quant.kernels.ops  # noqa: F401  (registers the ops)
from quant.formats import fp8, get_format, mxfp4
from quant.kernels import fp8_gemm, mxfp4_gemm, triton_available, tuning
from quant.kernels.fp8_quant import quantize_fp8_per_token_reference
from quant.matmul.backends import triton as registry
from quant.matmul.registry import DeviceInfo, _choose

OQ = torch.ops.onlinequant


def test_ops_match_python_entry_points():
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    q, s = OQ.fp8_quant_per_token(x, "e4m3fn")
    qr, sr = quantize_fp8_per_token_reference(x)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    wq, ws = fp8.quantize_weight(torch.randn(32, 64) * 0.02)
    torch.testing.assert_close(
        OQ.fp8_linear_act_fused(x, wq, ws, None), fp8_gemm.fp8_linear_act_fused(x, wq, ws), rtol=0, atol=0
    )
    codes, scales = mxfp4.quantize(torch.randn(32, 64))
    assert torch.equal(OQ.mxfp4_dequantize(codes, scales, "bf16"), mxfp4_gemm.mxfp4_dequantize(codes, scales))
    y = OQ.mxfp4_linear_w4a16_kernel(x, codes, scales, None)
    torch.testing.assert_close(y, mxfp4_gemm.mxfp4_linear_w4a16(x, codes, scales), rtol=0, atol=0)


def test_compile_fullgraph_through_kernel_ops():
    """A block using the kernel ops traces into one graph (fake impls give shapes and dtypes)."""
    codes, scales = mxfp4.quantize(torch.randn(48, 64) * 0.02)
    wq, ws = fp8.quantize_weight(torch.randn(64, 48) * 0.02)

    def block(x):
        h = torch.nn.functional.gelu(OQ.mxfp4_linear_w4a16_kernel(x, codes, scales, None))
        q, s = OQ.fp8_quant_per_token(h, "e4m3fn")
        return (q.float() * s).to(x.dtype) @ (wq.float() * ws).t().to(x.dtype)

    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x), rtol=0, atol=0)


def test_second_import_reuses_ops():
    before = OQ.fp8_quant_per_token
    mod = sys.modules["quant.kernels.ops"]
    importlib.reload(mod)  # registering again must not raise
    assert OQ.fp8_quant_per_token is before or callable(OQ.fp8_quant_per_token)


SM90 = DeviceInfo("cuda", 0, "nvidia", (9, 0), "sm_90")


@pytest.mark.parametrize(
    "fmt,compute,info,expected",
    [
        ("fp8_e4m3fn", "auto", SM90, "triton_fp8"),
        # no FP8 tensor cores on sm_80: the FP8 weight is dequantized for a bf16 GEMM
        ("fp8_e4m3fn", "auto", DeviceInfo("cuda", 0, "nvidia", (8, 0), "sm_80"), "triton_fp8_w8a16"),
        ("fp8_e4m3fn", "w8a16", SM90, "triton_fp8_w8a16"),  # a weights-only layer
        ("fp8_e4m3fnuz", "w8a16", SM90, "reference"),  # Triton has e4m3fnuz only on ROCm
        ("fp8_e4m3fnuz", "auto", DeviceInfo("cuda", 0, "amd", (9, 4), "gfx942"), "triton_fp8"),
        ("fp8_e4m3fn", "auto", DeviceInfo("cpu"), "reference"),
        ("mxfp4", "auto", SM90, "triton_mxfp4"),
        ("mxfp4", "w4a8", SM90, "triton_mxfp4_w4a8"),
        ("mxfp4", "w4a8", DeviceInfo("cuda", 0, "nvidia", (8, 0), "sm_80"), "reference"),
        ("mxfp4", "auto", DeviceInfo("cuda", 0, "amd", (9, 4), "gfx942"), "reference"),
    ],
)
def test_backend_choice(fmt, compute, info, expected):
    if expected.startswith("triton") and not triton_available():
        pytest.skip("Triton is not installed (the CPU wheels of older torch come without it)")
    assert _choose(get_format(fmt), info, compute, None).name == expected


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels run on the CPU only under TRITON_INTERPRET=1 (tests/run.sh sets it)",
)
def test_backend_runs_match_reference_on_cpu():
    """The registered run functions (what the GPU uses) give the pack's reference results."""
    from quant.matmul.reference import reference_linear

    x = torch.randn(300, 64, dtype=torch.bfloat16)  # M >= 256: the large-M paths
    b = torch.randn(48, dtype=torch.bfloat16)
    q8 = get_format("fp8_e4m3fn").quantize(torch.randn(48, 64) * 0.02)
    q4 = get_format("mxfp4").quantize(torch.randn(48, 64) * 0.02)
    cases = [(registry._mxfp4_run, q4, "w4a16", 3e-2)]
    if has_cpu_scaled_mm():  # FP8 W8A8 and MXFP4 W4A8 are `_scaled_mm` row-wise at M >= 256
        cases += [(registry._fp8_run, q8, "w8a8", 2e-2), (registry._mxfp4_run, q4, "w4a8", 3e-2)]
    for run, qw, compute, atol in cases:
        torch.testing.assert_close(
            run(x, qw, b, compute).float(), reference_linear(x, qw, b, compute).float(), rtol=2e-2, atol=atol
        )
    assert registry._fp8_run(x[:0], q8, b, "w8a8").shape == (0, 48)
    # few tokens: the FP8 backend runs the weights-only in-register GEMM (bf16 activations)
    few = registry._fp8_run(x[:4], q8, b, "w8a8").float()
    torch.testing.assert_close(few, reference_linear(x[:4], q8, b, "w8a16").float(), rtol=2e-2, atol=2e-2)
    assert not torch.allclose(few, reference_linear(x[:4], q8, b, "w8a8").float(), rtol=0, atol=1e-3)


def test_per_shape_rules():
    assert tuning.choose_fp8_path(4096, 3072, 3072) == "rowwise"
    assert tuning.choose_fp8_path(4096, 40, 3072) == "fused"  # _scaled_mm needs N % 16 == 0
    small = tuning.FP8_W8A8_IN_REGISTERS_MAX_M
    assert tuning.choose_fp8_path(1, 15360, 256) == tuning.choose_fp8_path(small, 40, 3072) == "in_registers"
    assert tuning.choose_fp8_path(small + 1, 3072, 3072) == "rowwise"
    assert tuning.choose_mxfp4_path(4096, 3072, 3072) == "dequant"
    assert tuning.choose_mxfp4_path(16, 3072, 3072) == "fused"


def test_flat_scale_views_fp32_and_converts_the_rest():
    """The kernels' 1-D fp32 scale: the weight's own storage when it already is fp32 and contiguous
    (no copy on each call), a converted copy otherwise; equal values either way."""
    from quant.kernels import flat_scale

    per_row = torch.rand(8, 1) + 0.5
    assert flat_scale(per_row).shape == (8,) and flat_scale(per_row).data_ptr() == per_row.data_ptr()
    assert flat_scale(torch.tensor(0.25)).tolist() == [0.25]
    half = per_row.to(torch.bfloat16)
    out = flat_scale(half)
    assert out.dtype == torch.float32 and torch.equal(out, half.float().reshape(-1))
    strided = torch.rand(8, 2)[:, :1]  # [8, 1] with row stride 2: not contiguous
    assert not strided.is_contiguous()
    assert torch.equal(flat_scale(strided), strided.reshape(-1)) and flat_scale(strided).is_contiguous()
    # ... and as the [1, N] row `_scaled_mm` takes: a view per channel, expanded per tensor
    from quant.kernels import scale_row

    row = scale_row(per_row, 8)
    assert row.shape == (1, 8) and row.data_ptr() == per_row.data_ptr()
    assert torch.equal(scale_row(torch.tensor(0.25), 8), torch.full((1, 8), 0.25))
    assert scale_row(torch.tensor(0.25), 8).is_contiguous()
