"""MXFP4 GEMM kernels (quant/kernels/mxfp4_gemm.py) against their references, under
TRITON_INTERPRET=1 on the CPU (compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch_caps import has_cpu_scaled_mm, interpreter_gap

from quant.formats import mxfp4
from quant.kernels import mxfp4_gemm as mg

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _random_mx(n, k, seed=0, lo=118, hi=126):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scales = torch.randint(lo, hi, (n, k // 32), generator=g, dtype=torch.uint8)
    return codes, scales


def test_decode_reference_matches_quant_mxfp4():
    codes, scales = _random_mx(16, 128, lo=100, hi=140)
    scales[0, 0] = 0  # 2**-127
    ours = mg.decode_mxfp4_reference(codes, scales)
    theirs = mxfp4.dequantize(codes, scales, torch.float32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["w4a16", "dot_scaled", "w4a8", "w4a16_dequant", "w4a8_dequant"])
@pytest.mark.parametrize("m,k,n,bias", [(5, 96, 48, True), (33, 256, 40, False), (1, 64, 17, True)])
def test_kernel_matches_reference(device, variant, m, k, n, bias):
    fn, ref = {
        "w4a16": (mg.mxfp4_linear_w4a16, mg.mxfp4_linear_w4a16_reference),
        "dot_scaled": (mg.mxfp4_linear_w4a16_dot_scaled, mg.mxfp4_linear_w4a16_dot_scaled_reference),
        "w4a8": (mg.mxfp4_linear_w4a8, mg.mxfp4_linear_w4a8_reference),
        "w4a16_dequant": (mg.mxfp4_linear_w4a16_dequant, mg.mxfp4_linear_w4a16_dequant_reference),
        "w4a8_dequant": (mg.mxfp4_linear_w4a8_dequant, mg.mxfp4_linear_w4a8_dequant_reference),
    }[variant]
    if variant == "w4a8_dequant" and device == "cpu" and not has_cpu_scaled_mm():
        pytest.skip("this PyTorch has no CPU torch._scaled_mm with row-wise scales")
    if variant == "dot_scaled" and device == "cpu" and (gap := interpreter_gap("dot_scaled")):
        pytest.skip(gap)
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    codes, scales = (t.to(device) for t in _random_mx(n, k, seed=n))
    b = torch.randn(n, generator=g).to(torch.bfloat16).to(device) if bias else None
    y = fn(x, codes, scales, b, torch.float32)
    yr = ref(x, codes, scales, b, torch.float32)
    assert y.shape == (m, n) and y.dtype == torch.float32
    if variant.endswith("dequant"):  # cuBLAS / _scaled_mm with a bf16 output: bf16 rounding
        torch.testing.assert_close(y, yr, rtol=1e-2, atol=2e-2)
    else:  # same products; fp32 sums in another order (GPU FP8 accumulation: a bit looser)
        tol = 2e-3 if (device == "cuda" and variant == "w4a8") else 1e-5
        torch.testing.assert_close(y, yr, rtol=tol, atol=max(tol, 1e-4))


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_kernels_bit_exact(device):
    codes, scales = _random_mx(40, 320, seed=7, lo=100, hi=135)
    scales[3, 2] = 90  # a block 10+ binades below its row max: e4m3 subnormals / zero in the fp8 fold
    codes, scales = codes.to(device), scales.to(device)
    for dtype in (torch.bfloat16, torch.float16):
        w = mg.mxfp4_dequantize(codes, scales, dtype)
        assert torch.equal(w, mg.mxfp4_dequantize_reference(codes, scales, dtype))
    w8, s8 = mg.mxfp4_to_fp8(codes, scales)
    w8r, s8r = mg.mxfp4_to_fp8_reference(codes, scales)
    assert torch.equal(w8.view(torch.uint8), w8r.view(torch.uint8)) and torch.equal(s8, s8r)
    # the fold is exact where the spread is small: dequantized e4m3 x row scale == MXFP4 values
    exact = mg.decode_mxfp4_reference(codes, scales)
    ok = (scales.amax(1, keepdim=True).int() - scales.int() <= 8).repeat_interleave(32, 1)
    torch.testing.assert_close((w8.float() * s8)[ok], exact[ok], rtol=0, atol=0)


def test_w4a8_scale_spread_and_error_budget():
    """W4A8 folds block scales into e4m3 relative to the row max: exact while the spread is <= 8
    binades; its error against the unquantized product stays within 1.5x of W4A16's."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[:, :32] *= 50  # one loud block per row: 5-6 binades of scale spread
    codes, scales = mxfp4.quantize(w)
    x = torch.randn(16, 256, generator=g).to(torch.bfloat16)
    exact = x.float() @ w.t()
    e16 = (mg.mxfp4_linear_w4a16(x, codes, scales, None, torch.float32) - exact).norm() / exact.norm()
    e8 = (mg.mxfp4_linear_w4a8(x, codes, scales, None, torch.float32) - exact).norm() / exact.norm()
    assert e8 <= 1.5 * e16


def test_3d_input_and_fp32_input():
    codes, scales = _random_mx(24, 64)
    x = torch.randn(2, 5, 64)
    y = mg.mxfp4_linear_w4a16(x, codes, scales)
    assert y.shape == (2, 5, 24) and y.dtype == torch.float32
    yr = mg.mxfp4_linear_w4a16_reference(x.to(torch.bfloat16), codes, scales, None, torch.float32)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "variant", [mg.mxfp4_linear_w4a16, mg.mxfp4_linear_w4a8, mg.mxfp4_linear_w4a16_dot_scaled]
)
def test_bad_shapes_raise(variant):
    codes, scales = _random_mx(8, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        variant(torch.randn(2, 48), codes, scales)
