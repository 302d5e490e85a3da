"""Fake quantization (quantize, then dequantize to fp32) through the formats' own reference code:
what the quality bench and the activation statistics compare."""

from __future__ import annotations

import torch
from torch import Tensor

from ..formats import fp8, mxfp4

#: Weight variants the bench and the activation statistics compare.
WEIGHT_VARIANTS = ("fp8_channel", "fp8_tensor", "mxfp4_even", "mxfp4_floor", "mxfp4_ceil")


def fake_quantize_weight(w: Tensor, variant: str) -> Tensor:
    """Quantize-dequantize a [N, K] weight with one of WEIGHT_VARIANTS; returns fp32."""

    w = w.float()
    if variant.startswith("fp8_"):
        q, s = fp8.quantize_weight(w, granularity=variant[4:])
        return fp8.dequantize(q, s, torch.float32)
    if variant.startswith("mxfp4_"):
        codes, scales = mxfp4.quantize(w, rounding=variant[6:])
        return mxfp4.dequantize(codes, scales, torch.float32)
    raise ValueError(f"unknown weight variant {variant!r}; known: {', '.join(WEIGHT_VARIANTS)}")


def fake_quantize_activation(x: Tensor, bits: int) -> Tensor:
    """Quantize-dequantize activations [..., K] as the W8A8 / W4A4 paths do: 8 = FP8 e4m3 with a
    dynamic per-token scale; 4 = MXFP4 with AITER's `dynamic_mxfp4_quant` rounding ("even")."""

    x = x.float()
    if bits == 8:
        q, s = fp8.quantize_activation(x)
        return q.float() * s
    if bits == 4:
        codes, scales = mxfp4.quantize(x, rounding="even")
        return mxfp4.dequantize(codes, scales, torch.float32)
    raise ValueError(f"activation bits must be 8 or 4, got {bits}")


__all__ = ["WEIGHT_VARIANTS", "fake_quantize_activation", "fake_quantize_weight"]
