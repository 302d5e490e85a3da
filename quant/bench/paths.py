"""The GEMM paths the benchmark compares, each built from a bf16 weight once (quantization
excluded from timing) and returning a `fn(x) -> y` closure. Also used by the tune section."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..formats import get_format
from ..kernels import fp8_dequant, fp8_gemm, mxfp4_gemm
from ..kernels.fp8_quant import quantize_fp8_per_token, quantize_fp8_per_token_reference

FP8 = torch.float8_e4m3fn


def comfy_fp8_unscaled(w: torch.Tensor, b: torch.Tensor | None):
    """ComfyUI's `fp8_e4m3fn_fast`: weights cast to fp8 without a scale, input clamped and cast,
    `_scaled_mm` with unit scales (comfy/ops.py fp8_linear)."""
    w8 = w.to(FP8)
    one = torch.ones((), device=w.device, dtype=torch.float32)

    def fn(x):
        xi = torch.clamp(x, min=-448, max=448).reshape(-1, x.shape[-1]).to(FP8).contiguous()
        y = torch._scaled_mm(xi, w8.t(), out_dtype=x.dtype, bias=b, scale_a=one, scale_b=one)
        return y.reshape(*x.shape[:-1], w.shape[0])

    return fn, w8.numel()


def _fp8_weight(w):
    qw = get_format("fp8_e4m3fn").quantize(w)
    return qw, qw.qdata.numel() + qw.scale.numel() * 4


def _mxfp4_weight(w):
    qw = get_format("mxfp4").quantize(w)
    return qw, qw.qdata.numel() + qw.scale.numel()


def _launch_cache(enabled: bool, fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) with quant/kernels/launch.py's cache on or off, then as it was."""
    from ..kernels import launch

    was, launch.CACHE_ENABLED = launch.CACHE_ENABLED, enabled
    try:
        return fn(*args, **kwargs)
    finally:
        launch.CACHE_ENABLED = was


def build_paths(
    w: torch.Tensor, b: torch.Tensor | None, x_example: torch.Tensor, include_compiled: bool = True
) -> dict[str, tuple[Callable, int]]:
    """name -> (fn(x) -> y, weight bytes)."""
    paths: dict[str, tuple[Callable, int]] = {}
    paths["bf16"] = (lambda x: F.linear(x, w, b), w.numel() * w.element_size())
    paths["comfy_fp8_unscaled"] = comfy_fp8_unscaled(w, b)

    qw8, nb8 = _fp8_weight(w)
    wq, ws = qw8.qdata, qw8.scale
    if x_example.device.type == "cuda":
        # cuBLAS row-wise FP8 GEMM on an already-quantized input: the ceiling the issue cites.
        xq, xs = quantize_fp8_per_token_reference(x_example.reshape(-1, x_example.shape[-1]))
        sb = ws.float().reshape(1, -1).contiguous()
        paths["fp8_gemm_only(no act quant)"] = (
            lambda x: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=sb, bias=b, out_dtype=torch.bfloat16),
            nb8,
        )
    paths["act_quant_only"] = (lambda x: quantize_fp8_per_token(x), 0)
    paths["ours_fp8_rowwise"] = (lambda x: fp8_gemm.fp8_linear_rowwise(x, wq, ws, b, fast_accum=False), nb8)
    paths["ours_fp8_rowwise_fastaccum"] = (
        lambda x: fp8_gemm.fp8_linear_rowwise(x, wq, ws, b, fast_accum=True),
        nb8,
    )
    paths["ours_fp8_fused"] = (lambda x: fp8_gemm.fp8_linear_act_fused(x, wq, ws, b), nb8)
    if include_compiled and x_example.device.type == "cuda":
        compiled = torch.compile(fp8_gemm.fp8_linear_traceable, dynamic=False)
        paths["ours_fp8_compiled"] = (lambda x: compiled(x, wq, ws, b), nb8)
    from ..matmul.linear import quantized_linear

    paths["ours_fp8_auto"] = (lambda x: _launch_cache(False, quantized_linear, x, qw8, b), nb8)
    # the same with cached Triton launches (quant/kernels/launch.py): the host time it saves
    paths["ours_fp8_auto_cached_launch"] = (lambda x: _launch_cache(True, quantized_linear, x, qw8, b), nb8)
    # weights only (a `weights-only:` layer): FP8 weight dequantized for a bf16 GEMM
    paths["ours_fp8_w8a16"] = (lambda x: quantized_linear(x, qw8, b, compute="w8a16"), nb8)
    paths["ours_fp8_w8a16_fused"] = (lambda x: fp8_dequant.fp8_linear_w8a16_fused(x, wq, ws, b), nb8)

    qw4, nb4 = _mxfp4_weight(w)
    codes, scales = qw4.qdata, qw4.scale
    smax = mxfp4_gemm.row_scale_max(scales)
    paths["ours_mxfp4_w4a16_dequant_cublas"] = (
        lambda x: mxfp4_gemm.mxfp4_linear_w4a16_dequant(x, codes, scales, b),
        nb4,
    )
    paths["ours_mxfp4_w4a16"] = (lambda x: mxfp4_gemm.mxfp4_linear_w4a16(x, codes, scales, b), nb4)
    paths["ours_mxfp4_w4a16_dot_scaled"] = (
        lambda x: mxfp4_gemm.mxfp4_linear_w4a16_dot_scaled(x, codes, scales, b),
        nb4,
    )
    paths["ours_mxfp4_w4a8"] = (
        lambda x: mxfp4_gemm.mxfp4_linear_w4a8(x, codes, scales, b, row_smax=smax),
        nb4,
    )
    paths["ours_mxfp4_w4a8_dequant_scaled_mm"] = (
        lambda x: mxfp4_gemm.mxfp4_linear_w4a8_dequant(x, codes, scales, b, row_smax=smax),
        nb4,
    )
    paths["ours_mxfp4_auto"] = (lambda x: quantized_linear(x, qw4, b), nb4)
    paths["ours_mxfp4_auto_w4a8"] = (lambda x: quantized_linear(x, qw4, b, compute="w4a8"), nb4)
    return paths
