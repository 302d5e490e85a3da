"""The format registry: names, sizes, shape rules, quantize/dequantize through the objects."""

from __future__ import annotations

import pytest
import torch

from quant.errors import NonFiniteWeightError
from quant.formats import FORMATS, QuantizedWeight, WeightFormat, fp8, get_format, mxfp4


def test_registry_names_and_aliases():
    for name in ("fp8_e4m3fn", "fp8_e4m3fnuz", "mxfp4", "fp8_e4m3fn_tensor", "mxfp4_ocp"):
        f = get_format(name)
        assert isinstance(f, WeightFormat) and f.name == name
    assert get_format("fp8").name == "fp8_e4m3fn"
    with pytest.raises(ValueError, match="known formats: .*mxfp4"):
        get_format("int4")


def test_bits_per_weight_and_packed_bytes():
    mx = get_format("mxfp4")
    assert mx.bits_per_weight == 4.25
    assert mx.packed_nbytes(3840, 3840) * 8 == 3840 * 3840 * 4.25
    f8 = get_format("fp8_e4m3fn")
    assert f8.packed_nbytes(100, 64) == 100 * 64 + 4 * 100
    assert get_format("fp8_e4m3fn_tensor").packed_nbytes(100, 64) == 100 * 64 + 4


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_packed_nbytes_matches_real_tensors(name):
    f = get_format(name)
    qw = f.quantize(torch.randn(48, 96))
    assert qw.nbytes == f.packed_nbytes(48, 96)
    assert qw.shape == (48, 96) and qw.format == name
    back = f.dequantize(qw, torch.float32)
    assert back.shape == (48, 96)
    assert torch.equal(qw.dequantize(torch.float32), back)


def test_unsupported_reason():
    mx = get_format("mxfp4")
    assert mx.min_in_multiple == 32
    assert mx.unsupported_reason(64, 3840) is None
    assert "multiple of 32" in mx.unsupported_reason(64, 40)
    assert get_format("fp8").unsupported_reason(64, 40) is None
    assert get_format("fp8").unsupported_reason(0, 40)
    with pytest.raises(ValueError, match="multiple of 32"):
        mx.quantize(torch.randn(4, 40))


def test_objects_use_the_reference_functions():
    w = torch.randn(16, 64)
    qw = get_format("mxfp4_ocp").quantize(w)
    codes, scales = mxfp4.quantize(w, "floor")
    assert torch.equal(qw.qdata, codes) and torch.equal(qw.scale, scales)
    qw = get_format("fp8_e4m3fnuz").quantize(w)
    q, s = fp8.quantize_weight(w, torch.float8_e4m3fnuz)
    assert qw.qdata.dtype == torch.float8_e4m3fnuz and torch.equal(qw.scale, s)


def test_non_finite_through_format():
    w = torch.randn(4, 64)
    w[0, 0] = float("nan")
    for name in FORMATS:
        with pytest.raises(NonFiniteWeightError):
            get_format(name).quantize(w)


def test_quantized_weight_to_and_rows():
    qw = get_format("fp8").quantize(torch.randn(8, 32))
    moved = qw.to("cpu")
    assert isinstance(moved, QuantizedWeight) and moved.shape == qw.shape and moved is not qw
    f = get_format("fp8")
    assert torch.equal(f.dequantize_rows(qw, 2, 5, torch.float32), f.dequantize(qw, torch.float32)[2:5])
    mx = get_format("mxfp4")
    qm = mx.quantize(torch.randn(8, 64))
    assert torch.equal(mx.dequantize_rows(qm, 3, 8, torch.float32), mx.dequantize(qm, torch.float32)[3:8])


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_finite_weights_stay_finite_at_the_top_of_bf16(name):
    """Blocks whose amax lies between 1.75 * 2^127 (~2.98e38) and bf16's max: a scale rule that
    picks 2^126 or 2^127 there would dequantize them to +-inf."""
    bf16max = torch.finfo(torch.bfloat16).max
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    w[0, :3] = torch.tensor([bf16max, -bf16max, 1.0])
    w[1, 5] = 2.99e38
    w[2, 40] = -3.2e38
    w[3, :] = torch.linspace(2.9e38, 3.3e38, 64)
    w = w.to(torch.bfloat16)
    assert torch.isfinite(w).all()
    f = get_format(name)
    back = f.dequantize(f.quantize(w), torch.float32)
    assert torch.isfinite(back).all(), name
    assert back.abs().max() >= 2.5e38  # saturated near the top, not flushed
