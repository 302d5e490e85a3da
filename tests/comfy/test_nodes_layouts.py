"""The pack's comfy-kitchen layouts: the packed weight survives what ComfyUI does to weights
(empty_like + copy_, .to(dtype), clone, detach), dequantizes to what the format says, and
F.linear on it gives the quantized matmul's result."""

from __future__ import annotations

import helpers_models as hm
import pytest
import torch

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def L(pack):
    hm.import_submodules(pack, "nodes.layouts", "quant.formats", "quant.matmul.linear")
    return pack


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_e4m3fnuz", "mxfp4"])
def test_quantized_tensor_survives_comfy_weight_handling(L, fmt):
    lay = L.nodes.layouts
    w = torch.randn(96, 64) * 0.05
    qt = lay.quantize_to_tensor(w, fmt, torch.bfloat16)
    assert lay.is_online_quant(qt) and qt.shape == (96, 64) and qt.dtype == torch.bfloat16
    qw = lay.as_quantized_weight(qt)
    ref = L.quant.formats.get_format(fmt).dequantize(qw, torch.bfloat16)
    assert torch.equal(qt.dequantize(), ref)

    # ComfyUI's cast_to: empty_like(dtype=...) then copy_
    r = torch.empty_like(qt, dtype=torch.float32)
    r.copy_(qt)
    assert lay.is_online_quant(r) and r.dtype == torch.float32
    assert torch.equal(r.dequantize(), L.quant.formats.get_format(fmt).dequantize(qw, torch.float32))
    # to(dtype, copy) / clone / detach keep the packed bytes and the format
    for t in (qt.to(torch.float16, copy=True), qt.clone(), qt.detach()):
        assert lay.is_online_quant(t)
        assert torch.equal(t._qdata.view(torch.uint8), qt._qdata.view(torch.uint8))
        assert torch.equal(t._params.scale, qt._params.scale) and t._params.format == qt._params.format
    c = qt.clone()
    c._params.scale.mul_(2)  # a clone's scale is its own
    assert not torch.equal(c._params.scale, qt._params.scale)
    assert lay.packed_nbytes(qt) == L.quant.formats.get_format(fmt).packed_nbytes(96, 64)
    assert qt.state_dict("x.weight").keys() == {"x.weight", "x.weight_scale"}


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
def test_aten_linear_handler_and_fallback_ops(L, fmt):
    lay = L.nodes.layouts
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * 0.05
    b = torch.randn(64, generator=g) * 0.01
    x = torch.randn(4, 96, generator=g).bfloat16()
    qt = lay.quantize_to_tensor(w, fmt, torch.bfloat16)
    want = L.quant.matmul.linear.quantized_linear(x, lay.as_quantized_weight(qt), b.bfloat16())
    got = lay._linear_handler(qt, (x, qt, b.bfloat16()), {})
    assert torch.equal(got, want)
    # ops without a handler (F.linear decomposes to t + mm) fall back to dequantize: correct
    fallback = torch.nn.functional.linear(x, qt, b.bfloat16())
    assert hm.rel_err(torch.nn.functional.linear(x, qt.dequantize(), b.bfloat16()), fallback) < 1e-2
