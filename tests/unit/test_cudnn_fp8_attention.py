"""cuDNN FP8 attention on the CPU: the graph building, caching and layout logic against a fake
`cudnn` module (tests/support/fake_cudnn.py), the quantization pre-pass (K smoothing exact for
softmax, scales mapping amax to 448), and the message when nvidia-cudnn-frontend is missing.
The real kernel needs a Hopper GPU and is measured elsewhere."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import fake_cudnn
import pytest
import torch

from quant.attention import cudnn_fp8 as C
from quant.errors import BackendUnavailableError

needs_interp = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels run on the CPU only under TRITON_INTERPRET=1 (tests/run.sh sets it)",
)


@pytest.fixture
def fake():
    m = fake_cudnn.make()
    C.set_cudnn_module(m)
    yield m
    C.set_cudnn_module(None)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def qkv(b=1, h=2, length=24, d=32, *, seed=0, layout="bhld", bias=0.0):
    """bf16 [B,H,L,D] tensors: 'bhld' contiguous, 'blhd' views of [B,L,H·D] memory (Wan's)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, length, h, d, generator=g) for _ in range(3))
    k = k + bias * torch.randn(d, generator=g)  # a per-channel bias: what smoothing removes
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    if layout == "blhd":
        return tuple(t.flatten(2).unflatten(-1, (h, d)).transpose(1, 2) for t in (q, k, v))
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))


def sdpa32(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())


# --------------------------------------------------------------------------- pre-pass
def test_smoothing_k_is_exact_for_softmax():
    q, k, v = (t.float() for t in qkv(length=40, bias=3.0))
    k_smooth = k - k.mean(dim=2, keepdim=True)
    assert torch.allclose(sdpa32(q, k_smooth, v), sdpa32(q, k, v), atol=1e-5)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_scales_map_amax_to_448_and_keep_the_layout(layout):
    q, k, v = qkv(layout=layout, bias=2.0)
    x = C.quantize_qkv_reference(q, k, v)
    k_smooth = k.float() - k.float().mean(dim=2, keepdim=True)
    cases = ((q.float(), x.q, x.descale_q), (k_smooth, x.k, x.descale_k), (v.float(), x.v, x.descale_v))
    for src, x8, ds in cases:
        assert x8.dtype == torch.float8_e4m3fn and x8.shape == src.shape and x8.stride() == q.stride()
        assert ds.shape == (1, 1, 1, 1) and ds.dtype == torch.float32
        assert float(x8.float().abs().amax()) == 448.0
        assert torch.allclose(ds, src.abs().amax() / 448.0)
        assert rel(x8.float() * ds, src) < 0.04  # e4m3: 3 mantissa bits


def test_per_head_scales_and_smoothing_lowers_k_amax():
    q, k, v = qkv(h=3, bias=4.0)
    x = C.quantize_qkv_reference(q, k, v, granularity="head")
    assert x.descale_k.shape == (1, 3, 1, 1)
    assert torch.equal(x.k.float().abs().amax(dim=(0, 2, 3)), torch.full((3,), 448.0))
    raw = C.quantize_qkv_reference(q, k, v, smooth_k=False)
    assert float(raw.descale_k) > 2 * float(C.quantize_qkv_reference(q, k, v).descale_k)
    with pytest.raises(ValueError, match="granularity"):
        C.quantize_qkv_reference(q, k, v, granularity="token")


# --------------------------------------------------------------------------- graphs (fake cudnn)
def test_graph_is_built_once_per_shape_and_layout(fake):
    q, k, v = qkv()
    C.cudnn_fp8_attention(q, k, v)
    C.cudnn_fp8_attention(*qkv(seed=1))  # same shapes and strides, other values: same graph
    assert len(fake.graphs) == 1 and len(fake.graphs[0].executions) == 2 and len(fake.handles) == 1
    g = fake.graphs[0]
    assert g.steps == ["validate", "build_operation_graph", "create_execution_plans", "check_support",
                       "build_plans"]  # fmt: skip
    assert g.kwargs["io_data_type"] == "FP8_E4M3" and g.kwargs["compute_data_type"] == "FLOAT"
    C.cudnn_fp8_attention(*qkv(length=32))  # another length
    C.cudnn_fp8_attention(*qkv(layout="blhd"))  # same shape, other strides
    assert len(fake.graphs) == 3 and C.graph_cache_size() == 3


def test_tensors_descales_and_scales_passed(fake):
    q, k, v = qkv(d=64, bias=1.0)
    C.cudnn_fp8_attention(q, k, v)
    g = fake.graphs[0]
    kw = g.sdpa_kwargs
    assert kw["is_inference"] is True and kw["use_causal_mask"] is False
    assert kw["attn_scale"] == pytest.approx(1 / math.sqrt(64))
    pack = {t.name: x for t, x in g.executions[0].items()}
    ref = C.quantize_qkv_reference(q, k, v)
    for n in ("q", "k", "v"):
        assert pack[n].dtype == torch.uint8  # FP8 bits as uint8: DLPack takes them on every torch
        assert torch.equal(pack[n], getattr(ref, n).view(torch.uint8))
        assert torch.equal(pack[f"descale_{n}"], getattr(ref, f"descale_{n}"))
    assert float(pack["scale_s"]) == 448.0 and float(pack["descale_s"]) == pytest.approx(1 / 448)
    # |O| <= amax(V), with headroom for P rounded to e4m3
    assert float(pack["scale_o"]) == pytest.approx(1 / (float(ref.descale_v) * C.O_HEADROOM))
    o_bits = pack["o"].view(torch.float8_e4m3fn).float()
    assert float(o_bits.abs().amax()) < 448.0 and torch.isfinite(o_bits).all()  # headroom: never saturates
    by_role = {id(t): t for t in g.tensors}
    assert all(id(kw[r]) in by_role for r in ("q", "k", "v", "descale_q", "scale_o"))
    o, _, amax_s, amax_o = g.outputs
    assert o.is_output and o.data_type == "FP8_E4M3" and amax_o.dim == [1, 1, 1, 1]


def test_wan_layout_goes_in_by_strides_without_copies(fake):
    b, h, length, d = 2, 3, 16, 32
    q, k, v = qkv(b, h, length, d, layout="blhd")
    out = C.cudnn_fp8_attention(q, k, v)
    g = fake.graphs[0]
    wan_strides = [length * h * d, d, h * d, 1]
    descs = {t.name: t for t in g.tensors}
    assert all(descs[n].stride == wan_strides for n in ("q", "k", "v"))
    assert g.outputs[0].stride == wan_strides  # O written as [B,L,H,D] memory
    pack = {t.name: x for t, x in g.executions[0].items()}
    assert all(list(pack[n].stride()) == wan_strides for n in ("q", "k", "v", "o"))
    assert out.shape == (b, h, length, d) and list(out.stride()) == wan_strides
    assert out.transpose(1, 2).reshape(b, length, h * d).data_ptr() == out.data_ptr()  # a view


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_fake_cudnn_result_is_close_to_sdpa(fake, layout):
    q, k, v = qkv(h=2, length=64, d=64, layout=layout, bias=2.0)
    out = C.cudnn_fp8_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert rel(out, sdpa32(q, k, v)) < 0.08  # ~6% here: FP8 Q/K/V/P/O with one scale per tensor


@needs_interp
@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_triton_pre_pass_and_dequant_on_the_call_path(fake, monkeypatch, granularity):
    """Where Triton runs (here the interpreter) the call takes the fused pre-pass and the one-launch
    dequantization, and gives what the reference path gives."""
    q, k, v = qkv(h=2, length=40, d=64, layout="blhd", bias=2.0)
    used = []
    for name in ("quantize_qkv_triton", "dequantize_o_triton"):
        f = getattr(C, name)
        monkeypatch.setattr(C, name, lambda *a, _f=f, _n=name, **kw: used.append(_n) or _f(*a, **kw))
    out = C.cudnn_fp8_attention(q, k, v, granularity=granularity, balance=True)
    assert used == ["quantize_qkv_triton", "dequantize_o_triton"]
    pack = {t.name: x for t, x in fake.graphs[0].executions[0].items()}
    ref = C.quantize_qkv_reference(q, k, v, granularity=granularity, balance=True)
    assert pack["descale_q"].shape == ref.descale_q.shape
    torch.testing.assert_close(pack["scale_o"], ref.scale_o, rtol=1e-5, atol=0)
    assert out.dtype == q.dtype and out.stride() == q.stride()
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton can't run now: the references
    out_ref = C.cudnn_fp8_attention(q, k, v, granularity=granularity, balance=True)
    assert len(used) == 2
    assert rel(out, out_ref) < 0.01  # equal but where a K code moved by one e4m3 step
    assert rel(out, sdpa32(q, k, v)) < 0.08


# --------------------------------------------------------------------------- availability
def test_missing_package_names_it(monkeypatch):
    C.set_cudnn_module(None)
    monkeypatch.setitem(sys.modules, "cudnn", None)  # import cudnn -> ImportError
    with pytest.raises(BackendUnavailableError, match="nvidia-cudnn-frontend"):
        C.cudnn_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert "pip install nvidia-cudnn-frontend" in C.runtime_unavailable_reason()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    assert "Ada is untested" in C.runtime_unavailable_reason()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "NVIDIA GPU" in C.runtime_unavailable_reason()


def test_available_on_hopper_with_the_package(fake, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    for cap in ((9, 0), (10, 0), (12, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=cap: c)
        assert C.runtime_unavailable_reason() is None


def test_unsupported_calls():
    q, k, v = qkv()
    assert C.unsupported_reason(q, k, v) is None
    assert "mask" in C.unsupported_reason(q, k, v, torch.ones(1, 24, dtype=torch.bool))
    assert "float32" in C.unsupported_reason(q.float(), k.float(), v.float())
    q40, k40, v40 = qkv(d=40)
    assert "head dim 40" in C.unsupported_reason(q40, k40, v40)
    q, k, v = (t.transpose(-1, -2) for t in qkv(length=32, d=32))  # square: only the strides are wrong
    assert "contiguous" in C.unsupported_reason(q, k, v)
