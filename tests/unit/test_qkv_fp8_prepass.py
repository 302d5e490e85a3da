"""The cuDNN FP8 attention's pre-pass (quant/attention/cudnn_fp8.py): Q/K balancing in the
PyTorch reference, and the fused Triton pass (quant/kernels/qkv_fp8.py) against that reference
under TRITON_INTERPRET=1 at small shapes, with the dequantization of O."""

from __future__ import annotations

import torch

from quant.attention import cudnn_fp8 as C


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def make_qkv(b=1, h=2, length=24, d=64, *, seed=0, layout="bhld", dtype=torch.bfloat16, outliers=False):
    """[B,H,L,D] tensors: 'bhld' contiguous, 'blhd' views of [B,L,H,D] memory (Wan's layout).
    `outliers`: a few channels x20, in Q and in K apart, and a channel bias on K."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, length, h, d, generator=g) for _ in range(3))
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
