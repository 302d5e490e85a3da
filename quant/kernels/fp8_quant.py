"""Per-token FP8 activation quantization: the single-pass Triton kernel and its reference.

x [..., K] (bf16/fp16/fp32) -> q [..., K] fp8, scale fp32 [..., 1] with x ~= q * scale.
scale = max(amax_row, EPS) / fp8_max; q = saturate(x * (1 / scale)): the arithmetic of
quant.formats.fp8.quantize_activation. The kernel and the reference compute exactly these fp32
operations, so they agree bit for bit.
"""

from __future__ import annotations

import torch

from ..constants import AMAX_EPS as EPS  # amax floor: an all-zero row gets q = 0, never NaN
from ..formats import fp8
from ..formats.fp8 import fp8_max
from . import can_run_triton, flat_rows, interpreting, triton_cdiv
from .launch import launch as triton_launch


def quantize_fp8_per_token_reference(
    x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's reference, with its signature: the format's own per-token activation
    quantization (quant.formats.fp8.quantize_activation), which the kernel matches bit for bit."""
    return fp8.quantize_activation(x, dtype)


def _launch_config(k: int) -> tuple[int, int, int]:
    """(rows per program, BLOCK_K, num_warps): whole rows in registers, ~16-32 fp32 per thread."""
    block_k = max(16, 1 << (k - 1).bit_length())
    num_warps = min(16, max(1, block_k // 512))
    rows = max(1, min(8, 2048 // block_k))
    return rows, block_k, num_warps


def quantize_fp8_per_token(
    x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, launch: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton kernel where it can run (GPU, or CPU under TRITON_INTERPRET=1), else the reference.
    `launch` = (rows per program, num_warps) overrides the default (tuning only)."""
    k = x.shape[-1]
    # e4m3fnuz is an AMD type: Triton has it only on ROCm (MI300); elsewhere it is the reference.
    fnuz_off_rocm = dtype == torch.float8_e4m3fnuz and x.device.type == "cuda" and not torch.version.hip
    if not can_run_triton(x.device) or x.numel() == 0 or k > 65536 or fnuz_off_rocm:
        return quantize_fp8_per_token_reference(x, dtype)
    from ._tl_fp8_quant import fp8_per_token_quant_kernel

    x2 = flat_rows(x)
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    rows, block_k, num_warps = _launch_config(k)
    if launch is not None:
        rows, num_warps = launch
    grid = (triton_cdiv(m, rows),)
    constexprs = {
        "FP8_MAX": fp8_max(dtype),
        "EPS": EPS,
        "FNUZ": dtype == torch.float8_e4m3fnuz,
        "EMULATE_CVT": interpreting(),
        "ROWS": rows,
        "BLOCK_K": block_k,
        "num_warps": num_warps,
    }
    triton_launch(fp8_per_token_quant_kernel, grid, (x2, q, s, m, k, x2.stride(0), q.stride(0)), constexprs)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)
