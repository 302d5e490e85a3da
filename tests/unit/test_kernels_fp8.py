"""FP8 kernels (quant/kernels/fp8_quant.py, fp8_gemm.py) against their references.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/run.sh sets it); on a GPU the
same tests run the compiled kernels. Without Triton the wrappers fall back to the references and
the comparisons hold trivially (the references are then checked against quant.formats.fp8)."""

from __future__ import annotations

import pytest
import torch
from torch_caps import has_cpu_scaled_mm, interpreter_gap

from quant.formats import fp8, get_format
from quant.kernels import fp8_gemm
from quant.kernels.fp8_quant import quantize_fp8_per_token, quantize_fp8_per_token_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e4m3fnuz]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FP8_DTYPES)
@pytest.mark.parametrize("shape", [(5, 96), (3, 7, 200), (1, 4096), (17, 33), (2, 1)])
def test_act_quant_bit_exact(device, dtype, shape):
    if device == "cpu" and dtype == torch.float8_e4m3fnuz and (gap := interpreter_gap("e4m3fnuz")):
        pytest.skip(gap)
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    x = (torch.randn(shape, generator=g) * 3).to(torch.bfloat16).to(device)
    x.view(-1, shape[-1])[0, : min(3, shape[-1])] = 1e-4  # tiny values: e4m3 subnormals
    q, s = quantize_fp8_per_token(x, dtype)
    qr, sr = quantize_fp8_per_token_reference(x, dtype)
    assert q.shape == x.shape and s.shape == (*x.shape[:-1], 1)
    assert q.dtype == dtype and s.dtype == torch.float32
    assert torch.equal(_bits(q), _bits(qr))
    assert torch.equal(s, sr)


@pytest.mark.parametrize("dtype", FP8_DTYPES)
def test_act_quant_reference_is_quant_fp8(dtype):
    """The kernel's reference is the pack's definition of per-token quantization, bit for bit."""
    x = torch.randn(64, 300, dtype=torch.bfloat16) * 5
    q, s = quantize_fp8_per_token_reference(x, dtype)
    q2, s2 = fp8.quantize_activation(x, dtype)
    assert torch.equal(_bits(q), _bits(q2)) and torch.equal(s, s2)


def test_act_quant_zero_row_and_noncontiguous():
    x = torch.randn(8, 64, dtype=torch.float32)
    x[2] = 0
    xt = x.t().contiguous().t()  # same values, column-major: the wrapper must handle strides
    q, s = quantize_fp8_per_token(xt)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert (q[2].float() == 0).all()
    qr, sr = quantize_fp8_per_token_reference(x)
    assert torch.equal(_bits(q), _bits(qr)) and torch.equal(s, sr)


def _fp8_weight(n, k, seed=0, granularity="channel", dtype=torch.float8_e4m3fn):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    q, s = fp8.quantize_weight(w, dtype, granularity)
    return w, q, s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "m,k,n,bias,granularity,out_dtype",
    [
        (5, 200, 48, True, "channel", torch.float32),  # K not a multiple of the 128 group
        (33, 256, 40, False, "channel", torch.bfloat16),  # M, N not tile multiples
        (7, 96, 16, True, "tensor", torch.float32),  # per-tensor weight scale
        (1, 128, 24, True, "channel", torch.float16),
    ],
)
def test_fused_gemm_matches_reference(device, m, k, n, bias, granularity, out_dtype):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w, q, s = _fp8_weight(n, k, seed=n, granularity=granularity)
    q, s = q.to(device), s.to(device)
    b = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16).to(device) if bias else None
    y = fp8_gemm.fp8_linear_act_fused(x, q, s, b, out_dtype)
    yr = fp8_gemm.fp8_linear_act_fused_reference(x, q, s, b, out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    # CPU (interpreter): fp32 sums in another order. GPU: Hopper's FP8 tensor cores accumulate
    # each 128-long group with a shorter mantissa than fp32, so a looser bound there.
    tight = out_dtype == torch.float32 and device == "cpu"
    tol = 1e-5 if tight else (2e-3 if out_dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(y.float(), yr.float(), rtol=tol, atol=tol)
    # and it is a good approximation of the unquantized product (1x128-group FP8 ~ 3% on N(0,1))
    exact = x.float() @ w.to(device).t() + (b.float() if bias else 0)
    err = float((yr.float() - exact).norm() / exact.norm())
    assert err < 0.06


def test_fused_gemm_3d_input_and_default_dtype():
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    _, q, s = _fp8_weight(32, 128)
    y = fp8_gemm.fp8_linear_act_fused(x, q, s)
    assert y.shape == (2, 3, 32) and y.dtype == torch.bfloat16
    yr = fp8_gemm.fp8_linear_act_fused_reference(x, q, s)
    torch.testing.assert_close(y, yr, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_rowwise_and_traceable_match_reference(device):
    if device == "cpu" and not has_cpu_scaled_mm():
        pytest.skip("this PyTorch has no CPU torch._scaled_mm with row-wise scales")
    x = torch.randn(4, 9, 64, dtype=torch.bfloat16, device=device)
    _, q, s = _fp8_weight(48, 64)
    q, s = q.to(device), s.to(device)
    b = torch.randn(48, dtype=torch.bfloat16, device=device)
    yr = fp8_gemm.fp8_linear_rowwise_reference(x, q, s, b)
    y = fp8_gemm.fp8_linear_rowwise(x, q, s, b)
    yt = fp8_gemm.fp8_linear_traceable(x, q, s, b)
    assert y.shape == (4, 9, 48) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), yr.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(yt, y, rtol=0, atol=0)  # same quantization, same GEMM


def test_rowwise_reference_equals_pack_reference():
    """Our row-wise reference computes what quant.matmul.linear's w8a8 emulation computes."""
    from quant.formats import get_format
    from quant.matmul.reference import reference_linear

    x = torch.randn(6, 64, dtype=torch.float32)
    w = torch.randn(32, 64) * 0.02
    qw = get_format("fp8_e4m3fn").quantize(w)
    y = fp8_gemm.fp8_linear_rowwise_reference(x, qw.qdata, qw.scale)
    y2 = reference_linear(x, qw, None, "w8a8")
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)


# --- weights-only FP8 (W8A16): Triton dequantization + 16-bit GEMM ------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_e4m3fn_tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(37, 96), (64, 256), (5, 33)])
def test_fp8_dequantize_kernel_is_the_reference_bit_for_bit(device, fmt, dtype, n, k):
    from quant.kernels.fp8_dequant import fp8_dequantize, fp8_dequantize_reference

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.05
    qw = get_format(fmt).quantize(w.to(device))
    got = fp8_dequantize(qw.qdata, qw.scale, dtype)
    assert got.dtype == dtype and torch.equal(got, fp8_dequantize_reference(qw.qdata, qw.scale, dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_w8a16_linear_matches_the_weight_only_reference(device):
    from quant.kernels.fp8_dequant import fp8_linear_w8a16, fp8_linear_w8a16_reference
    from quant.matmul.reference import reference_linear

    g = torch.Generator().manual_seed(0)
    qw = get_format("fp8_e4m3fn").quantize((torch.randn(48, 64, generator=g) * 0.05).to(device))
    x = torch.randn(3, 5, 64, generator=g).to(device, torch.bfloat16)
    b = torch.randn(48, generator=g).to(device, torch.bfloat16)
    y = fp8_linear_w8a16(x, qw.qdata, qw.scale, b)
    assert y.shape == (3, 5, 48) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, fp8_linear_w8a16_reference(x, qw.qdata, qw.scale, b))
    torch.testing.assert_close(y.float(), reference_linear(x, qw, b, "w8a16").float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_e4m3fn_tensor"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k,bias", [(1, 48, 64, True), (17, 40, 96, False), (40, 33, 50, True)])
def test_fp8_w8a16_fused_gemm_matches_its_reference(device, fmt, x_dtype, m, n, k, bias):
    from quant.kernels.fp8_dequant import fp8_linear_w8a16_fused, fp8_linear_w8a16_fused_reference
    from quant.matmul.reference import reference_linear

    g = torch.Generator().manual_seed(m * n + k)
    qw = get_format(fmt).quantize((torch.randn(n, k, generator=g) * 0.05).to(device))
    x = torch.randn(2, m, k, generator=g).to(device, x_dtype)
    b = torch.randn(n, generator=g).to(device, torch.bfloat16) if bias else None
    y = fp8_linear_w8a16_fused(x, qw.qdata, qw.scale, b)
    assert y.shape == (2, m, n) and y.dtype == x_dtype
    ref = fp8_linear_w8a16_fused_reference(x, qw.qdata, qw.scale, b)
    # same fp32 arithmetic, summed in another order; outputs differ by at most an ulp of x_dtype
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2)
    assert (y.float() - ref.float()).norm() <= 4e-3 * ref.float().norm()
    # and it is the weights-only product: what the reference linear computes for "w8a16"
    torch.testing.assert_close(y.float(), reference_linear(x, qw, b, "w8a16").float(), rtol=3e-2, atol=3e-2)


def test_the_w8a16_backend_takes_the_fused_gemm_for_few_tokens(monkeypatch):
    from quant.kernels import fp8_dequant, tuning
    from quant.matmul.backends import triton as tb

    calls = []
    monkeypatch.setattr(fp8_dequant, "fp8_linear_w8a16_fused", lambda *a: calls.append("fused") or 1)
    monkeypatch.setattr(fp8_dequant, "fp8_linear_w8a16", lambda *a: calls.append("dequant") or 2)
    qw = get_format("fp8_e4m3fn").quantize(torch.randn(32, 64) * 0.05)
    limit = tuning.FP8_W8A16_FUSED_MAX_M  # 64, from the H100 measurements in tuning.py
    for m in (1, limit, limit + 1, 4096):
        tb._fp8_w8a16_run(torch.randn(m, 64), qw, None, "w8a16")
    assert calls == ["fused", "fused", "dequant", "dequant"]
