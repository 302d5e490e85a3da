"""The cuDNN FP8 attention's pre-pass (quant/attention/cudnn_fp8.py): Q/K balancing in the
PyTorch reference, and the fused Triton pass (quant/kernels/qkv_fp8.py) against that reference
under TRITON_INTERPRET=1 at small shapes, with the dequantization of O."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from quant.attention import cudnn_fp8 as C
from quant.kernels import qkv_fp8 as QK

needs_interp = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels run on the CPU only under TRITON_INTERPRET=1 (tests/run.sh sets it)",
)
BF16, F16 = torch.bfloat16, torch.float16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def make_qkv(b=1, h=2, length=24, d=64, *, lk=None, seed=0, layout="bhld", dtype=BF16, outliers=False):
    """[B,H,L,D] tensors (K and V of length `lk`, default `length`): 'bhld' contiguous, 'blhd'
    views of [B,L,H,D] memory (Wan's layout). `outliers`: a few channels x20, in Q and in K
    apart, and a channel bias on K."""
    g = torch.Generator().manual_seed(seed)
    lk = length if lk is None else lk
    q, k, v = (torch.randn(b, n, h, d, generator=g) for n in (length, lk, lk))
    if outliers:
        ch = torch.randperm(d, generator=g)[:8]
        q[..., ch[:4]] *= 20
        k[..., ch[4:]] *= 20
        k += 3 * torch.randn(d, generator=g)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if layout == "blhd":
        return tuple(t.transpose(1, 2) for t in (q, k, v))
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))


def dequant(x8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    return x8.float() * descale


def qk(x: C.FP8QKV) -> torch.Tensor:
    """Q·Kᵀ from the pre-pass's FP8 tensors."""
    return dequant(x.q, x.descale_q) @ dequant(x.k, x.descale_k).transpose(-1, -2)


# --------------------------------------------------------------------------- balancing (reference)
def test_balancing_keeps_q_kt_and_evens_the_channels():
    q, k, v = make_qkv(2, 3, 40, 64, outliers=True)
    k_smooth = k.float() - k.float().mean(dim=2, keepdim=True)
    exact = q.float() @ k_smooth.transpose(-1, -2)
    plain = C.quantize_qkv_reference(q, k, v, granularity="head")
    bal = C.quantize_qkv_reference(q, k, v, granularity="head", balance=True)
    errs = [rel(qk(x), exact) for x in (plain, bal)]
    # Q/s and K*s leave Q·Kᵀ as it was; e4m3's error is relative to each value, so (unlike INT8)
    # balancing neither helps nor hurts much here: ~4% either way
    assert errs[1] < 0.05 and errs[1] < 1.3 * errs[0]
    # balanced, a channel's amax is sqrt(amax|Q| amax|K|) in both Q and K
    aq = q.float().abs().amax(dim=2)
    ak = k_smooth.abs().amax(dim=2)
    qb = dequant(bal.q, bal.descale_q).abs().amax(dim=2)
    kb = dequant(bal.k, bal.descale_k).abs().amax(dim=2)
    torch.testing.assert_close(qb, (aq * ak).sqrt(), rtol=0.07, atol=0)  # e4m3: within half a step
    torch.testing.assert_close(kb, (aq * ak).sqrt(), rtol=0.07, atol=0)
    # V is untouched by balancing, and O's scales follow V's
    assert torch.equal(bal.v.view(torch.uint8), plain.v.view(torch.uint8))
    assert torch.equal(bal.descale_o, plain.descale_o)
    torch.testing.assert_close(bal.descale_o, plain.descale_v.amax().reshape(1, 1, 1, 1) * C.O_HEADROOM)
    torch.testing.assert_close(bal.scale_o * bal.descale_o, torch.ones(1, 1, 1, 1))


def test_balancing_leaves_zero_channels_alone():
    q, k, v = make_qkv(1, 2, 16, 64)
    q[..., :8] = 0  # a channel all zero in Q: s = 1 there, no division by zero
    k[:, :, :, 8:16] = 1.5  # constant in K: zero after smoothing
    x = C.quantize_qkv_reference(q, k, v, balance=True)
    assert all(torch.isfinite(t.float()).all() for t in (x.q, x.k, x.v, x.descale_q, x.descale_k))
    assert not x.q.float()[..., :8].any() and not x.k.float()[..., 8:16].any()


# --------------------------------------------------------------------------- Triton vs reference
def ordered_codes(x8: torch.Tensor) -> torch.Tensor:
    """e4m3 codes as integers that count e4m3 steps (sign and magnitude to signed; ±0 are 0)."""
    bits = x8.view(torch.uint8).int()
    mag = bits & 0x7F
    return torch.where(bits >= 0x80, -mag, mag)


def fields(x: C.FP8QKV) -> tuple:
    return x.q, x.k, x.v, x.descale_q, x.descale_k, x.descale_v, x.descale_o, x.scale_o


def assert_matches_reference(x: tuple, ref: C.FP8QKV, *, exact_q: bool = True) -> None:
    """Descales to 1e-5; V's codes (and Q's without balancing) equal; K's (and balanced Q's, whose
    factors come from K's mean) within one e4m3 step, since the kernel sums K in another order."""
    q8, k8, v8, dq, dk, dv, do, so = x
    for name, got, want in (("q", q8, ref.q), ("k", k8, ref.k), ("v", v8, ref.v)):
        assert got.dtype == torch.float8_e4m3fn and got.shape == want.shape and got.stride() == want.stride()
        steps = (ordered_codes(got) - ordered_codes(want)).abs()
        assert int(steps.max()) <= (0 if name == "v" or (name == "q" and exact_q) else 1), name
        assert float((steps > 0).float().mean()) < 0.01, name  # a few ties flip, not more
    for got, want in ((dq, ref.descale_q), (dk, ref.descale_k), (dv, ref.descale_v), (do, ref.descale_o)):
        assert got.shape == want.shape and got.stride() == want.stride() and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(so, ref.scale_o, rtol=1e-5, atol=0)


SHAPES = [  # (B, H, LQ, LK, D): lengths that cross the interpreter's 16-row blocks, and cross-attention
    (1, 2, 40, 40, 64),
    (2, 3, 37, 37, 128),
    (2, 2, 24, 40, 64),
    (1, 3, 48, 17, 128),
]
FLAGS = [  # (granularity, smooth_k, balance, layout): all of them
    (g, sm, bal, lay)
    for g in ("tensor", "head")
    for sm in (True, False)
    for bal in (False, True)
    for lay in ("bhld", "blhd")
]


@needs_interp
@pytest.mark.parametrize("case", range(len(FLAGS)))
def test_triton_pass_matches_reference(case):
    granularity, smooth, balance, layout = FLAGS[case]
    b, h, lq, lk, d = SHAPES[case % len(SHAPES)]
    dtype = (BF16, F16)[(case // len(SHAPES)) % 2]
    q, k, v = make_qkv(b, h, lq, d, lk=lk, layout=layout, dtype=dtype, outliers=True, seed=case)
    opts = dict(granularity=granularity, smooth_k=smooth, balance=balance)
    got = QK.quantize_qkv_triton(q, k, v, **opts, o_headroom=C.O_HEADROOM)
    assert got[0].stride() == q.stride() and got[1].stride() == k.stride()  # the inputs' layouts
    assert_matches_reference(got, C.quantize_qkv_reference(q, k, v, **opts), exact_q=not balance)


@needs_interp
@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_all_zero_inputs_get_finite_scales(granularity):
    q, k, v = (torch.zeros_like(t) for t in make_qkv(2, 2, 20, 64, layout="blhd"))
    opts = dict(granularity=granularity, smooth_k=True, balance=True)
    got = QK.quantize_qkv_triton(q, k, v, **opts, o_headroom=C.O_HEADROOM)
    assert all(not t.float().any() for t in got[:3])
    assert all(torch.isfinite(t).all() and (t > 0).all() for t in got[3:])
    assert_matches_reference(got, C.quantize_qkv_reference(q, k, v, **opts))


@needs_interp
def test_quantize_qkv_takes_the_triton_pass_and_balancing_keeps_q_kt(monkeypatch):
    q, k, v = make_qkv(1, 2, 40, 64, layout="blhd", outliers=True)
    calls = []
    triton_pass = C.quantize_qkv_triton
    monkeypatch.setattr(C, "quantize_qkv_triton", lambda *a, **kw: calls.append(kw) or triton_pass(*a, **kw))
    x = C.quantize_qkv(q, k, v, granularity="head", balance=True)
    assert len(calls) == 1 and calls[0]["o_headroom"] == C.O_HEADROOM and calls[0]["balance"] is True
    assert x.descale_q.shape == (1, 2, 1, 1) and x.scale_o.shape == (1, 1, 1, 1)
    exact = q.float() @ (k.float() - k.float().mean(dim=2, keepdim=True)).transpose(-1, -2)
    assert rel(qk(x), exact) < 0.05
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton can't run here now: the reference
    ref = C.quantize_qkv(q, k, v, granularity="head", balance=True)
    assert len(calls) == 1
    assert_matches_reference(fields(ref), C.quantize_qkv_reference(q, k, v, granularity="head", balance=True))


# --------------------------------------------------------------------------- O's dequantization
@needs_interp
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_dequantize_o_matches_reference(dtype):
    g = torch.Generator().manual_seed(5)
    b, h, length, d = 2, 3, 50, 64
    o = torch.randn(b, length, h, d, generator=g) * 100
    o8 = o.clamp(-448, 448).to(torch.float8_e4m3fn).transpose(1, 2)  # [B,H,L,D] view of [B,L,H,D]
    descale = torch.full((1, 1, 1, 1), 0.0123)
    got = QK.dequantize_o_triton(o8, descale, dtype)
    want = C.dequantize_o_reference(o8, descale, dtype)
    assert got.dtype == dtype and got.stride() == o8.stride() == want.stride()
    assert torch.equal(got, want)
    assert C.dequantize_o(o8, descale, dtype).stride() == o8.stride()


def test_dequantize_o_falls_back_where_o8_is_not_dense():
    o8 = torch.ones(1, 2, 8, 64).to(torch.float8_e4m3fn)[:, :, ::2]
    assert (
        not QK.is_dense(o8) and QK.is_dense(o8.contiguous()) and QK.is_dense(o8.contiguous().transpose(1, 2))
    )
    out = C.dequantize_o(o8, torch.full((1, 1, 1, 1), 0.5), BF16)
    assert out.shape == o8.shape and torch.equal(out, torch.full(o8.shape, 0.5, dtype=BF16))


def test_triton_only_where_e4m3fn_works(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.version, "hip", None)
    for cap, ok in (((9, 0), True), ((8, 9), True), ((8, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=cap: c)
        assert C.fp8_triton_device(cuda) is ok
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm has e4m3fnuz, not e4m3fn
    assert not C.fp8_triton_device(cuda)
    assert C.fp8_triton_device(torch.device("cpu"))  # the interpreter (can_run_triton decides)
    with pytest.raises(ValueError, match="granularity"):
        QK.quantize_qkv_triton(*make_qkv(), granularity="token")


def test_stats_chunking():
    # GPU: ~1024 programs in all, at most 64 chunks per (batch, head), chunks a multiple of the block
    assert QK.stats_chunking(4096, 30, 32, gpu=True) == (128, 32)  # Z-Image: 960 programs
    assert QK.stats_chunking(75600, 40, 32, gpu=True) == (2912, 26)
    assert QK.stats_chunking(4096, 1, 32, gpu=True) == (64, 64)
    assert QK.stats_chunking(20, 30, 32, gpu=True) == (32, 1)
    assert QK.stats_chunking(40, 6, 16, gpu=False) == (16, 3)  # interpreter: one block per chunk
