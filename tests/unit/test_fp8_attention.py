"""FP8/INT8 attention: the Triton kernels against their PyTorch reference under
TRITON_INTERPRET=1 at small shapes, the reference against fp32 SDPA, the custom op's fake
implementation, and the fallbacks the attention node relies on."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from quant.attention import fp8 as A
from quant.errors import AttentionUnsupportedError
from quant.kernels import fp8_attention as K

needs_interp = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels run on the CPU only under TRITON_INTERPRET=1 (tests/run.sh sets it)",
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def qkv(b, h, lq, lk, d, *, seed, outliers=False, layout="bhld"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g)
    k = torch.randn(b, lk, h, d, generator=g)
    v = torch.randn(b, lk, h, d, generator=g)
    if outliers:  # a few channels ×20 (Q and K in different channels) and a K channel bias
        ch = torch.randperm(d, generator=g)[:8]
        q[..., ch[:4]] *= 20
        k[..., ch[4:]] *= 20
        k += torch.randn(d, generator=g) * 2
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    if layout == "blhd":
        return tuple(t.flatten(2) for t in (q, k, v))
    return tuple(t.transpose(1, 2) for t in (q, k, v))  # [B,H,L,D] views of [B,L,H,D] memory


def exact(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())


# ---------------------------------------------------------------- reference (pure PyTorch, fast)
def test_reference_error_bounds_vs_fp32():
    q, k, v = qkv(1, 2, 256, 256, 64, seed=0)
    ref = exact(q, k, v)
    accurate = A.fp8_attention_reference(q, k, v, block_n=64, v_fp8=False)
    fast = A.fp8_attention_reference(q, k, v, block_n=64)
    e4m3 = A.fp8_attention_reference(q, k, v, block_n=64, qk_int8=False, v_fp8=False)
    assert rel(accurate, ref) < 0.015
    assert rel(fast, ref) < 0.05
    assert rel(accurate, ref) < rel(e4m3, ref)  # why INT8 is the default for Q·Kᵀ
    assert rel(accurate, ref) < rel(fast, ref)  # FP8 P·V costs accuracy (notes/E.md has numbers)


def test_reference_balancing_rescues_outliers():
    q, k, v = qkv(1, 2, 256, 256, 64, seed=1, outliers=True)
    ref = exact(q, k, v)
    plain = A.fp8_attention_reference(q, k, v, block_n=64, v_fp8=False, balance=False)
    balanced = A.fp8_attention_reference(q, k, v, block_n=64, v_fp8=False)
    assert rel(balanced, ref) < 0.05
    assert rel(balanced, ref) < 0.5 * rel(plain, ref)


def test_reference_smoothing_removes_a_key_bias():
    # softmax ignores q·μ added to a whole row; subtracting K's mean keeps the bias from
    # setting K's scales
    q, k, v = qkv(1, 2, 96, 128, 64, seed=2)
    k = (k.float() + torch.randn(64) * 8).to(torch.bfloat16)
    ref = exact(q, k, v)
    smooth = A.fp8_attention_reference(q, k, v, block_n=32, v_fp8=False)
    plain = A.fp8_attention_reference(q, k, v, block_n=32, v_fp8=False, smooth_k=False)
    assert rel(smooth, ref) < 0.015
    assert rel(smooth, ref) < rel(plain, ref)


def test_fp8_round_is_nearest_even_and_saturating():
    x = torch.tensor([100.0, -248.0, 304.0, 7.93, 500.0, -1e4, 0.0012, 3e-4, 2.5 * 2.0**-9])
    got = A._fp8_round(x)
    assert got.tolist() == [96.0, -256.0, 320.0, 8.0, 448.0, -448.0, 2.0**-9, 0.0, 2.0**-8]
    assert torch.equal(got, x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float())  # PyTorch's cast agrees


# ---------------------------------------------------------------- kernels vs reference
@needs_interp
@pytest.mark.parametrize(
    "d,lq,lk,mode",
    [
        (64, 70, 45, dict()),  # default: INT8 Q·Kᵀ, FP8 P·V, K per block
        (128, 40, 33, dict(v_fp8=False, k_per_token=True)),
        (64, 33, 64, dict(qk_int8=False)),
    ],
)
def test_kernel_matches_reference(d, lq, lk, mode):
    q, k, v = qkv(2, 2, lq, lk, d, seed=3)
    cfg = K.default_config(d, q.device)
    out = K.fp8_attention_triton(q, k, v, torch.full_like(q, float("nan")), config=cfg, **mode)
    ref = A.fp8_attention_reference(q, k, v, block_n=cfg.block_n, **mode)
    assert torch.isfinite(out).all()  # every element written (poisoned with NaN)
    # not bit-exact: fp32 sums in another order can flip a rounding
    assert rel(out, ref) < (0.01 if mode.get("qk_int8", True) else 0.02)
    assert rel(out, exact(q, k, v)) < 0.06


@needs_interp
def test_layouts_agree_and_outliers_stay_bounded():
    q, k, v = qkv(1, 3, 50, 50, 64, seed=4, outliers=True, layout="blhd")  # Wan: [B,L,H·D]
    o_blhd = A.fp8_attention(q, k, v, layout="blhd", heads=3, pv="bf16")
    assert o_blhd.shape == q.shape and o_blhd.dtype == torch.bfloat16
    qh, kh, vh = (t.unflatten(-1, (3, 64)).transpose(1, 2) for t in (q, k, v))  # Z-Image views
    o_bhld = A.fp8_attention(qh, kh, vh, layout="bhld", pv="bf16")
    assert o_bhld.shape == qh.shape
    assert torch.equal(o_bhld.transpose(1, 2).flatten(2), o_blhd)
    assert rel(o_bhld, exact(qh, kh, vh)) < 0.06


@needs_interp
def test_stats_kernel_matches_torch():
    q, k, _ = qkv(2, 3, 70, 100, 64, seed=5)
    for smooth, bal in ((True, True), (True, False)):
        a = K.attention_stats(q, k, smooth_k=smooth, balance=bal)
        b = K.attention_stats_triton(q, k, smooth_k=smooth, balance=bal)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- op, compile, fallbacks
def test_op_is_registered_once_and_has_a_fake():
    assert A._register_op() is A._OP  # a second import of the package reuses the op
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 4, 300, 128, dtype=torch.bfloat16)
        out = A._OP(q, q, q, True, True, True, True, False)
        assert out.shape == (1, 300, 4, 128) and out.dtype == torch.bfloat16
        out = A._OP(q, q, q, False, True, True, True, False)
        assert out.shape == (1, 4, 300, 128)


@needs_interp
def test_torch_compile_traces_the_op():
    q, k, v = qkv(1, 2, 20, 20, 64, seed=6, layout="blhd")

    def f(q, k, v):
        return A.fp8_attention(q, k, v, layout="blhd", heads=2) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


def test_fallbacks_say_why():
    q, k, v = qkv(1, 2, 16, 16, 64, seed=7)
    mask = torch.zeros(16, 16)
    assert "mask" in A.unsupported_reason(q, k, v, mask)
    assert "dtype" in A.unsupported_reason(q.float(), k.float(), v.float())
    q80 = torch.zeros(1, 2, 16, 80, dtype=torch.bfloat16)
    assert "head dim 80" in A.unsupported_reason(q80, q80, q80)
    with pytest.raises(AttentionUnsupportedError, match="mask|dtype|head dim"):
        A.fp8_attention(q.float(), k.float(), v.float())
    with pytest.raises(AttentionUnsupportedError, match="heads"):
        A.fp8_attention(q, k, v, layout="blhd")
    # ComfyUI's signature: None means "run your own function"
    assert A.comfy_fp8_attention(q, k, v, 2, mask=mask, skip_reshape=True) is None
    assert A.unsupported_comfy_reason(q, k, v, 2, mask=mask, skip_reshape=True) == "an attention mask"


def test_cpu_without_interpreter_is_unsupported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv(1, 2, 16, 16, 64, seed=8)
    assert "CUDA" in A.unsupported_reason(q, k, v)
    assert A.comfy_fp8_attention(q, k, v, 2, skip_reshape=True) is None


@needs_interp
def test_comfy_adapter_output_layouts():
    q, k, v = qkv(1, 2, 24, 24, 64, seed=9)  # Z-Image: skip_reshape=True, output [B,L,H·D]
    out = A.comfy_fp8_attention(q, k, v, 2, skip_reshape=True)
    assert out.shape == (1, 24, 128)
    out_bhld = A.comfy_fp8_attention(q, k, v, 2, skip_reshape=True, skip_output_reshape=True)
    assert out_bhld.shape == (1, 2, 24, 64)
    torch.testing.assert_close(out_bhld.transpose(1, 2).flatten(2), out)
    view = A.fp8_attention_bhld(q, k, v)  # the node registry's layout, no copy on reshape
    assert view.shape == q.shape and view.transpose(1, 2).is_contiguous()
