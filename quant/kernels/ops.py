"""torch.library ops for the kernels themselves (namespace `onlinequant`, fake impls for
torch.compile). The quantized Linear's own entry points are quant/ops.py's `fp8_linear` /
`mxfp4_linear`, which reach these kernels through the backend registry; the ops here let a
compiled graph call a kernel directly (e.g. per-token FP8 quantization after a fused producer).

Guarded like quant/ops.py: an op that already exists (the pack imported a
second time under another name) is reused, never redefined.
"""

from __future__ import annotations

import torch

from ..matmul.op import NAMESPACE, _op_exists
from . import fp8_gemm, fp8_quant, mxfp4_gemm

_FP8 = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _fp8_quant(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8_quant.quantize_fp8_per_token(x, _FP8[dtype])


def _fp8_quant_fake(x, dtype):
    return x.new_empty(x.shape, dtype=_FP8[dtype]), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _fp8_fused(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return fp8_gemm.fp8_linear_act_fused(x, w_q, w_scale, bias)


def _linear_fake(x, w, scale, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _w4a16(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return mxfp4_gemm.mxfp4_linear_w4a16(x, codes, scales, bias)


def _w4a8(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return mxfp4_gemm.mxfp4_linear_w4a8(x, codes, scales, bias)


def _dequant(codes: torch.Tensor, scales: torch.Tensor, dtype: str) -> torch.Tensor:
    return mxfp4_gemm.mxfp4_dequantize(codes, scales, _DT[dtype])


def _dequant_fake(codes, scales, dtype):
    return codes.new_empty((codes.shape[0], codes.shape[1] * 2), dtype=_DT[dtype])


OPS = {
    "fp8_quant_per_token": (_fp8_quant, _fp8_quant_fake),
    "fp8_linear_act_fused": (_fp8_fused, _linear_fake),
    "mxfp4_linear_w4a16_kernel": (_w4a16, _linear_fake),
    "mxfp4_linear_w4a8_kernel": (_w4a8, _linear_fake),
    "mxfp4_dequantize": (_dequant, _dequant_fake),
}


def register_ops() -> None:
    for name, (impl, fake) in OPS.items():
        if _op_exists(name):
            continue
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(impl)
        op.register_fake(fake)


register_ops()
