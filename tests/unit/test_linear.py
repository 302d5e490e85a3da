"""quantized_linear: reference paths, output error bands, dtype/shape rules."""

from __future__ import annotations

import pytest
import torch

from quant.formats import get_format
from quant.matmul.linear import quantized_linear
from quant.matmul.reference import reference_linear

# Relative L2 output error of one Linear, N(0,1) weights and activations, K=3840
# (computed): FP8 W8A16 2.6%, W8A8 3.7%; MXFP4 W4A16 11.5%, W4A8 11.8%, W4A4 16%. Bands: +-25%.
EXPECTED = [
    ("fp8_e4m3fn", "w8a16", 0.026),
    ("fp8_e4m3fn", "w8a8", 0.037),
    ("fp8_e4m3fnuz", "w8a16", 0.026),
    ("fp8_e4m3fnuz", "w8a8", 0.037),
    ("mxfp4", "w4a16", 0.115),
    ("mxfp4", "w4a8", 0.118),
    ("mxfp4", "w4a4", 0.16),
    ("mxfp4_ocp", "w4a16", 0.115),
    ("mxfp4_ocp", "w4a4", 0.16),
]


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    k, n, m = 3840, 256, 64
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g)
    return x, w, b, torch.nn.functional.linear(x.double(), w.double(), b.double())


def rel_l2(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("fmt,compute,expected", EXPECTED)
def test_output_error_near_published_figures(problem, fmt, compute, expected):
    x, w, b, ref = problem
    qw = get_format(fmt).quantize(w)
    err = rel_l2(quantized_linear(x, qw, b, compute=compute), ref)
    assert expected * 0.75 < err < expected * 1.25, err


def test_error_ordering(problem):
    x, w, _, ref = problem
    errs = {}
    for fmt in ("fp8", "mxfp4"):
        qw = get_format(fmt).quantize(w)
        for c in get_format(fmt).computes:
            errs[c] = rel_l2(quantized_linear(x, qw, compute=c), ref)
    assert errs["w8a16"] < errs["w8a8"] < errs["w4a16"] < errs["w4a8"] < errs["w4a4"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_e4m3fn_tensor", "mxfp4"])
def test_dtype_and_shape(dtype, fmt):
    qw = get_format(fmt).quantize(torch.randn(48, 64))
    x = torch.randn(2, 3, 64, dtype=dtype)
    bias = torch.randn(48, dtype=dtype)
    for c in ("auto", *get_format(fmt).computes):
        y = quantized_linear(x, qw, bias, compute=c)
        assert y.shape == (2, 3, 48) and y.dtype == dtype


def test_w16_paths_equal_dequantized_linear():
    w = torch.randn(40, 96)
    x = torch.randn(7, 96)
    for fmt in ("fp8", "mxfp4"):
        qw = get_format(fmt).quantize(w)
        wd = get_format(fmt).dequantize(qw, torch.float32)
        y = quantized_linear(x, qw, compute="auto")
        torch.testing.assert_close(y, x @ wd.t(), rtol=1e-5, atol=1e-5)


def test_w8a8_is_exact_emulation():
    # acc of the exact fp8 products in fp32, then row scale * column scale: check by hand.
    from quant.formats import fp8

    w = torch.randn(24, 64)
    x = torch.randn(5, 64)
    qw = get_format("fp8").quantize(w)
    xq, xs = fp8.quantize_activation(x)
    expected = (xq.double() @ qw.qdata.double().t()) * xs.double() * qw.scale.double().t()
    y = quantized_linear(x, qw, compute="w8a8")
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)


def test_chunked_weight_rows(monkeypatch):
    from quant.matmul import reference

    w = torch.randn(50, 64)
    x = torch.randn(4, 64)
    for fmt in ("fp8", "mxfp4"):
        qw = get_format(fmt).quantize(w)
        full = {c: reference_linear(x, qw, None, c) for c in get_format(fmt).computes}
        monkeypatch.setattr(reference, "_CHUNK_ELEMS", 64 * 7)
        for c, y in full.items():
            torch.testing.assert_close(reference_linear(x, qw, None, c), y, rtol=1e-5, atol=1e-5)
        monkeypatch.undo()


def test_bad_requests():
    qw = get_format("mxfp4").quantize(torch.randn(8, 64))
    with pytest.raises(ValueError, match="compute mode"):
        quantized_linear(torch.randn(2, 64), qw, compute="w8a8")
    with pytest.raises(ValueError, match="features"):
        quantized_linear(torch.randn(2, 32), qw)


def test_nan_activation_propagates_instead_of_raising():
    qw = get_format("mxfp4").quantize(torch.randn(8, 64))
    x = torch.randn(2, 64)
    x[0, 0] = float("nan")
    y = quantized_linear(x, qw, compute="w4a4")
    assert y[0].isnan().all() and not y[1].isnan().any()


def test_error_table_command_covers_every_format():
    from quant.formats import FORMATS
    from quant.matmul.reference import output_error_table

    rows = output_error_table(k=256, n=64, m=16)
    assert {r[0] for r in rows} == set(FORMATS)
    assert all(0.0 < err < 0.3 for _, _, err in rows)
