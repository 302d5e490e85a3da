"""FP8 weight/activation reference quantization (e4m3fn and e4m3fnuz)."""

from __future__ import annotations

import pytest
import torch

from quant.constants import AMAX_EPS
from quant.errors import NonFiniteWeightError
from quant.formats import fp8

DTYPES = [torch.float8_e4m3fn, torch.float8_e4m3fnuz]


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (ref - approx).norm()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_round_trip(dtype, granularity):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 320, generator=g) * torch.logspace(-3, 1, 64).unsqueeze(1)
    q, scale = fp8.quantize_weight(w.to(torch.bfloat16), dtype, granularity)
    assert q.dtype == dtype and q.shape == w.shape
    assert scale.dtype == torch.float32
    assert scale.shape == ((64, 1) if granularity == "channel" else ())
    back = fp8.dequantize(q, scale, torch.float32)
    # Each row's amax maps to the dtype's max exactly (per channel).
    fmax = fp8.fp8_max(dtype)
    if granularity == "channel":
        assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), fmax))
        assert sqnr_db(w, back) > 28.0  # e4m3: ~31 dB on Gaussian rows
    else:  # rows spanning 4 decades share one scale: small rows lose precision
        assert sqnr_db(w, back) > 18.0
    assert fp8.dequantize(q, scale).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturates_instead_of_nan(dtype):
    # fnuz's cast gives NaN out of range; the clamp before the cast must prevent it.
    w = torch.tensor([[1.0, -2.0, 0.5]])
    q, scale = fp8.quantize_weight(w, dtype)
    assert not q.float().isnan().any()
    q, _ = fp8.quantize_weight(w * 1e30, dtype)
    assert not q.float().isnan().any()


def test_zero_rows_get_finite_scale():
    w = torch.zeros(3, 16)
    w[1] = 1.0
    q, scale = fp8.quantize_weight(w)
    assert torch.isfinite(scale).all() and scale[0].item() == pytest.approx(AMAX_EPS / 448)
    assert fp8.dequantize(q, scale, torch.float32)[0].eq(0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises(bad):
    w = torch.randn(8, 16)
    w[3, 3] = bad
    with pytest.raises(NonFiniteWeightError):
        fp8.quantize_weight(w)


def test_activation_per_token():
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16) * torch.arange(1, 11).view(2, 5, 1)
    q, s = fp8.quantize_activation(x)
    assert q.shape == x.shape and s.shape == (2, 5, 1) and s.dtype == torch.float32
    assert torch.allclose(q.float().abs().amax(-1), torch.full((2, 5), 448.0))
    assert sqnr_db(x.float(), q.float() * s) > 28.0
    qn, sn = fp8.quantize_activation(x, torch.float8_e4m3fnuz)
    assert torch.allclose(qn.float().abs().amax(-1), torch.full((2, 5), 240.0))


def test_activation_matches_weight_channel_path():
    # quantize_activation is the per-row twin of quantize_weight: identical bits.
    w = torch.randn(33, 48)
    qw, sw = fp8.quantize_weight(w)
    qa, sa = fp8.quantize_activation(w)
    assert torch.equal(qw.view(torch.uint8), qa.view(torch.uint8)) and torch.equal(sw, sa)


def test_chunking_is_invisible(monkeypatch):
    w = torch.randn(41, 64)
    full = fp8.quantize_weight(w)
    monkeypatch.setattr(fp8, "_CHUNK_ELEMS", 64 * 3)
    part = fp8.quantize_weight(w)
    assert torch.equal(full[0].view(torch.uint8), part[0].view(torch.uint8))
    assert torch.equal(fp8.dequantize(*full), fp8.dequantize(*part))


def test_bad_arguments():
    with pytest.raises(ValueError, match="FP8 dtype"):
        fp8.quantize_weight(torch.randn(2, 2), torch.float16)
    with pytest.raises(ValueError, match="granularity"):
        fp8.quantize_weight(torch.randn(2, 2), granularity="block")
    with pytest.raises(ValueError, match="2-D"):
        fp8.quantize_weight(torch.randn(2, 2, 2))
