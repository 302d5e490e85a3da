"""cuDNN FP8 attention on a real GPU (Hopper+, nvidia-cudnn-frontend installed): the kernel
against bf16 SDPA in both layouts the attention node sees, per-tensor and per-head descales,
the Triton pre-pass against its plain-PyTorch reference on the device, and graph reuse. Skips
elsewhere; the CPU side is tests/unit/test_cudnn_fp8_attention.py."""

from __future__ import annotations

import pytest
import torch

from quant.attention import cudnn_fp8 as C

_why = C.runtime_unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no real cuDNN FP8 attention here: {_why}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def qkv(layout: str, b=1, h=4, length=1000, d=128, seed=0, outliers=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, length, h, d, generator=g, device="cuda") for _ in range(3))
    if outliers:  # the attention bench's outlier input: channels x20 and a per-channel K bias
        q[..., :4] *= 20.0
        k[..., 4:8] *= 20.0
        k += torch.randn(d, generator=g, device="cuda") * 2.0
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    if layout == "blhd":  # Wan: [B,L,H*D] memory seen as [B,H,L,D]
        return tuple(t.flatten(2).unflatten(-1, (h, d)).transpose(1, 2) for t in (q, k, v))
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))


@pytest.mark.parametrize("granularity", ["tensor", "head"])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_kernel_against_bf16_sdpa(layout, granularity):
    q, k, v = qkv(layout)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    try:
        out = C.cudnn_fp8_attention(q, k, v, granularity=granularity)
    except Exception as e:  # cuDNN may refuse [1,H,1,1] descales: say so, the bench reports it
        if granularity == "head":
            pytest.xfail(f"cuDNN refused per-head descales: {type(e).__name__}: {str(e)[:200]}")
        raise
    assert out.shape == ref.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    assert rel(out, ref) < 0.1, rel(out, ref)  # e4m3 Q, K, V, P and O: ~6% on Gaussian inputs
    if layout == "blhd":  # a view of [B,L,H,D] memory: the caller's transpose back costs no copy
        assert out.transpose(1, 2).is_contiguous()


def test_graphs_are_reused_and_outliers_stay_bounded():
    C.clear_graph_cache()
    q, k, v = qkv("blhd", outliers=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    a = C.cudnn_fp8_attention(q, k, v)
    b = C.cudnn_fp8_attention(q, k, v)
    assert C.graph_cache_size() == 1 and torch.equal(a, b)
    assert rel(a, ref) < 0.3, rel(a, ref)


@pytest.mark.parametrize("balance", [False, True])
def test_triton_pre_pass_matches_its_reference_on_the_gpu(balance):
    q, k, v = qkv("blhd", outliers=True)
    t = C.quantize_qkv(q, k, v, balance=balance)
    r = C.quantize_qkv_reference(q, k, v, balance=balance)
    for name in ("descale_q", "descale_k", "descale_v"):
        torch.testing.assert_close(getattr(t, name), getattr(r, name), rtol=1e-5, atol=0)
    for name in ("q", "k", "v"):  # one e4m3 step at most (K's mean is summed in another order)
        a, b = getattr(t, name).float(), getattr(r, name).float()
        assert a.stride() == b.stride() or a.shape == b.shape
        assert float((a - b).abs().max()) <= float(b.abs().max()) * 2**-3, name
