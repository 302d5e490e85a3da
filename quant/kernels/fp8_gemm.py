"""FP8 W8A8 linear paths for GPUs with FP8 tensor cores (sm_89+, gfx942/gfx950).

- `fp8_linear_rowwise`: single-pass per-token activation quantization (Triton) feeding
  `torch._scaled_mm` with row-wise scales; bias and output dtype go through `_scaled_mm` itself.
- `fp8_linear_act_fused`: one Triton GEMM that quantizes each 1x128 activation group as it loads
  the tile (no separate pass, no FP8 copy of x in memory).

Weights: q [N, K] fp8 with scale fp32 [N, 1] (per channel) or [] (per tensor), as quant/fp8.py
stores them. Each path has a `*_reference` with the same signature.
"""

from __future__ import annotations

import torch

from ..constants import AMAX_EPS as EPS
from ..formats.fp8 import fp8_max
from . import can_run_triton, finish_linear, flat_rows, flat_scale, interpreting, scale_row, triton_cdiv
from .fp8_quant import quantize_fp8_per_token, quantize_fp8_per_token_reference

ACT_GROUP = 128  # activation scale granularity of the fused kernel (1 x 128, DeepGEMM's choice)


# Hopper FP8 fast accumulation for the row-wise GEMM, chosen by measurement (docs/benchmarks.md):
# on an H100 it made the GEMM 10-25% faster (1.5-1.85x bf16 instead of 1.2-1.5x) with the same
# output error against bf16 (3.8% on N(0,1) inputs at K=3072..14336) as the split accumulation.
FAST_ACCUM = True


# ---------------------------------------------------------------- row-wise: quant kernel + _scaled_mm
def fp8_linear_rowwise_reference(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    q, s = quantize_fp8_per_token_reference(flat_rows(x), w_q.dtype)
    return finish_linear(_rowwise_emulated(q, s, w_q, w_scale), x, bias, out_dtype or x.dtype)


def _rowwise_emulated(
    q: torch.Tensor, s: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """The row-wise FP8 GEMM in fp32: (q . w_q) * x_scale * w_scale, fp32 [M, N]."""
    return (q.float() @ w_q.float().t()) * s * scale_row(w_scale, w_q.shape[0])


def fp8_linear_rowwise(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    fast_accum: bool | None = None,
) -> torch.Tensor:
    """x [..., K] -> [..., N]. Needs `torch._scaled_mm` with row-wise scales (CUDA sm_89+, ROCm
    gfx942/950); `_scaled_mm` also needs K and N multiples of 16. `fast_accum` lets Hopper's FP8
    tensor cores accumulate without the periodic fp32 promotion (faster; default FAST_ACCUM)."""
    out_dtype = out_dtype or x.dtype
    n, k = w_q.shape
    q, s = quantize_fp8_per_token(flat_rows(x), w_q.dtype)
    if n % 16 or k % 16:
        # cuBLASLt FP8 needs K and N multiples of 16: same quantization, fp32 emulated GEMM
        # (rare: every Z-Image / Wan Linear that is quantized meets it).
        return finish_linear(_rowwise_emulated(q, s, w_q, w_scale), x, bias, out_dtype)
    # Row-wise _scaled_mm writes bf16 only; other dtypes cost one cast of the output.
    mm_dtype = torch.bfloat16
    b = None if bias is None else bias.to(mm_dtype)
    y = torch._scaled_mm(
        q,
        w_q.t(),
        scale_a=s,
        scale_b=scale_row(w_scale, n),
        bias=b,
        out_dtype=mm_dtype,
        use_fast_accum=FAST_ACCUM if fast_accum is None else fast_accum,
    )
    if y.dtype != out_dtype:
        y = y.to(out_dtype)
    return y.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------- fused: quantize A tiles in the GEMM
def fp8_linear_act_fused_reference(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    x2 = flat_rows(x).float()
    m, k = x2.shape
    n = w_q.shape[0]
    pad = (-k) % ACT_GROUP
    xp = torch.nn.functional.pad(x2, (0, pad)).view(m, -1, ACT_GROUP)
    q, s = quantize_fp8_per_token_reference(xp, w_q.dtype)  # per group of 128 = per "token" of xp
    wp = torch.nn.functional.pad(w_q.float(), (0, pad)).view(n, -1, ACT_GROUP)
    # sum over groups of (q_g . w_g) * s_g, the kernel's order of operations
    parts = torch.einsum("mgk,ngk->gmn", q.float(), wp)
    y = (parts * s.permute(1, 0, 2)).sum(0) * scale_row(w_scale, n)
    return finish_linear(y, x, bias, out_dtype or x.dtype)


# (BLOCK_M, BLOCK_N, num_warps, num_stages); tuned on H100 (see docs/benchmarks.md); BLOCK_K = 128.
FUSED_CONFIG = (128, 128, 8, 3)


def fp8_linear_act_fused(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    out_dtype = out_dtype or x.dtype
    if not can_run_triton(x.device):
        return fp8_linear_act_fused_reference(x, w_q, w_scale, bias, out_dtype)
    from ._tl_fp8_gemm import fp8_gemm_act_quant_kernel

    x2 = flat_rows(x)
    m, k = x2.shape
    n = w_q.shape[0]
    w = w_q if w_q.stride(-1) == 1 else w_q.contiguous()
    ws = flat_scale(w_scale)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    bm, bn, warps, stages = config or FUSED_CONFIG
    if interpreting():
        bm, bn = min(bm, 32), min(bn, 32)
    grid = (triton_cdiv(m, bm) * triton_cdiv(n, bn),)
    fp8_gemm_act_quant_kernel[grid](
        x2,
        w,
        ws,
        bias if bias is not None else ws,
        out,
        m,
        n,
        k,
        x2.stride(0),
        w.stride(0),
        out.stride(0),
        FP8_MAX=fp8_max(w_q.dtype),
        EPS=EPS,
        FNUZ=w_q.dtype == torch.float8_e4m3fnuz,
        EMULATE_CVT=interpreting(),
        W_PER_CHANNEL=ws.numel() > 1,
        HAS_BIAS=bias is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=ACT_GROUP,
        GROUP_M=8,
        num_warps=warps,
        num_stages=stages,
    )
    return out.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------- traceable: for torch.compile to fuse
def fp8_linear_traceable(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The row-wise path written in plain PyTorch ops only (no custom op, no Triton call), so that
    torch.compile can fuse the per-token quantization into the op that produces x (norm,
    modulation, GELU) and hand `_scaled_mm` to cuBLAS. Same arithmetic as fp8_linear_rowwise."""
    out_dtype = out_dtype or x.dtype
    n = w_q.shape[0]
    q, s = quantize_fp8_per_token_reference(x.reshape(-1, x.shape[-1]), w_q.dtype)
    b = None if bias is None else bias.to(torch.bfloat16)
    y = torch._scaled_mm(
        q,
        w_q.t(),
        scale_a=s,
        scale_b=scale_row(w_scale, n),
        bias=b,
        out_dtype=torch.bfloat16,
        use_fast_accum=FAST_ACCUM,
    )
    return y.to(out_dtype).reshape(*x.shape[:-1], n)
