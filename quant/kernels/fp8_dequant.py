"""Weights-only FP8 (W8A16): dequantize the FP8 weight to the activation dtype in one Triton pass,
then a 16-bit cuBLAS GEMM. Each function has a plain-PyTorch `*_reference` twin with its signature;
the references are the format's own dequantization, which the kernel matches bit for bit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import fp8
from . import can_run_triton, interpreting, triton_cdiv
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
    s = scale.float().reshape(-1).contiguous()
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


__all__ = ["fp8_dequantize", "fp8_dequantize_reference", "fp8_linear_w8a16", "fp8_linear_w8a16_reference"]
