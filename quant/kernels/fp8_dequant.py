"""Weights-only FP8 (W8A16), two paths (quant/kernels/tuning.py picks one per shape):

- `fp8_linear_w8a16`: the FP8 weight dequantized to the activation dtype in one Triton pass, then
  a 16-bit cuBLAS GEMM (many tokens: cuBLAS's speed, plus one memory pass over the weight);
- `fp8_linear_w8a16_fused`: one Triton GEMM that widens FP8 weight tiles in registers and scales
  the accumulator (few tokens: the GEMM reads the weight, one byte per element, and nothing else).

Each function has a plain-PyTorch `*_reference` twin with its signature: the dequantization's
is the format's own (matched bit for bit), the fused GEMM's is its fp32 arithmetic."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import fp8
from . import can_run_triton, finish_linear, flat_rows, flat_scale, interpreting, triton_cdiv
from .launch import launch as triton_launch


def fp8_dequantize_reference(q: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    return fp8.dequantize(q, scale, dtype)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """q [N, K] FP8 with an fp32 scale per row ([N, 1]) or per tensor ([]) -> [N, K] in dtype."""
    if not can_run_triton(q.device) or q.dim() != 2 or q.numel() == 0 or not q.is_contiguous():
        return fp8_dequantize_reference(q, scale, dtype)
    from ._tl_fp8_dequant import fp8_dequant_kernel

    n, k = q.shape
    out = torch.empty((n, k), dtype=dtype, device=q.device)
    s = flat_scale(scale)
    bn, bk = (16, 64) if interpreting() else (32, 256)
    grid = (triton_cdiv(n, bn), triton_cdiv(k, bk))
    constexprs = {
        "PER_ROW": s.numel() > 1,
        "EMULATE_BF16": interpreting() and dtype == torch.bfloat16,
        "BLOCK_N": bn,
        "BLOCK_K": bk,
    }
    triton_launch(fp8_dequant_kernel, grid, (q, s, out, n, k, q.stride(0), out.stride(0)), constexprs)
    return out


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out_dtype) -> torch.Tensor:
    y = F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def fp8_linear_w8a16_reference(x, q, scale, bias=None, out_dtype=None) -> torch.Tensor:
    return _linear(x, fp8_dequantize_reference(q, scale, _compute_dtype(x)), bias, out_dtype or x.dtype)


def fp8_linear_w8a16(x, q, scale, bias=None, out_dtype=None) -> torch.Tensor:
    """x [..., K] times the FP8 weight in x's 16-bit dtype (fp32 inputs compute in bf16)."""
    return _linear(x, fp8_dequantize(q, scale, _compute_dtype(x)), bias, out_dtype or x.dtype)


def fp8_linear_w8a16_fused_reference(x, q, scale, bias=None, out_dtype=None) -> torch.Tensor:
    """The fused kernel's arithmetic: 16-bit activations times the exact FP8 codes in fp32, the
    weight scale on the product (not rounded into a 16-bit weight first), then the bias."""
    x2 = flat_rows(x).to(_compute_dtype(x)).float()
    y = (x2 @ q.float().t()) * scale.float().reshape(1, -1)
    return finish_linear(y, x, bias, out_dtype or x.dtype)


def _fused_config(m: int, n: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the smallest tensor-core row tile that
    holds the tokens, and column tiles narrow enough to give every SM work (2 programs each on a
    132-SM H100) when the weight is what the GPU waits for."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    bn = 128
    while bn > 32 and triton_cdiv(m, bm) * triton_cdiv(n, bn) < 264:
        bn //= 2
    return bm, bn, 128, 4 if bm * bn <= 64 * 64 else 8, 4 if bm <= 64 else 3


def fp8_linear_w8a16_fused(x, q, scale, bias=None, out_dtype=None, config=None) -> torch.Tensor:
    """x [..., K] times the FP8 weight q [N, K] (scale [N, 1] or []), the weight widened in
    registers; fp32 inputs compute in bf16. `config` overrides `_fused_config` (tuning only)."""
    out_dtype = out_dtype or x.dtype
    if not can_run_triton(x.device) or q.dim() != 2:
        return fp8_linear_w8a16_fused_reference(x, q, scale, bias, out_dtype)
    from ._tl_fp8_w8a16 import fp8_w8a16_gemm_kernel

    x2 = flat_rows(x.to(_compute_dtype(x)))
    m, k = x2.shape
    n = q.shape[0]
    w = q if q.stride(-1) == 1 else q.contiguous()
    s = flat_scale(scale)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    bm, bn, bk, warps, stages = config or _fused_config(m, n)
    interp = interpreting()  # one environment read: this wrapper runs on every small FP8 Linear
    if interp:
        bm, bn, bk = 16, min(bn, 32), min(bk, 32)
    constexprs = {
        "PER_ROW": s.numel() > 1,
        "HAS_BIAS": bias is not None,
        "INTERPRET": interp,
        "EMULATE_BF16": interp and out_dtype == torch.bfloat16,
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_K": bk,
        "GROUP_M": 8,
        "num_warps": warps,
        "num_stages": stages,
    }
    args = (x2, w, s, bias if bias is not None else s, out, m, n, k, x2.stride(0), w.stride(0), out.stride(0))
    triton_launch(fp8_w8a16_gemm_kernel, (triton_cdiv(m, bm) * triton_cdiv(n, bn),), args, constexprs)
    return out.reshape(*x.shape[:-1], n)


__all__ = [
    "fp8_dequantize",
    "fp8_dequantize_reference",
    "fp8_linear_w8a16",
    "fp8_linear_w8a16_fused",
    "fp8_linear_w8a16_fused_reference",
    "fp8_linear_w8a16_reference",
]
