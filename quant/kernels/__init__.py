"""GPU kernels (Triton) for the quantized Linear, each next to a plain-PyTorch `*_reference`
with the same signature.

Triton is imported lazily, only when a kernel runs, so `quant` imports on machines without it.
The Triton sources live in `_tl_*.py` modules; the public modules here hold the wrappers, the
references and nothing that needs Triton at import time.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package can be imported (it may still lack a GPU: see `can_run`)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU interpreter that CI runs the kernels with)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run_triton(device) -> bool:
    """Whether a Triton kernel can run on tensors of `device`: a CUDA/ROCm GPU with Triton, or the
    CPU under the interpreter. ONLINEQUANT_DISABLE_TRITON=1 turns every kernel off (the
    references run), e.g. to compare or to run the CPU benchmark quickly."""
    if not triton_available() or os.environ.get("ONLINEQUANT_DISABLE_TRITON", "0") == "1":
        return False
    dev_type = getattr(device, "type", str(device))
    if dev_type == "cuda":
        return True
    return dev_type == "cpu" and interpreting()


# --- small helpers the kernel wrappers share (plain PyTorch; nothing here needs Triton) ---------


def triton_cdiv(a: int, b: int) -> int:
    """ceil(a / b): the number of programs along one grid axis."""
    return (a + b - 1) // b


def flat_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as a 2-D [M, K] matrix with unit stride along K (what the kernels index)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def flat_scale(scale: torch.Tensor) -> torch.Tensor:
    """A weight's fp32 scale ([N, 1], [N] or []) as the contiguous 1-D fp32 vector the kernels
    read; a view when it already is one (one call instead of three: this runs on every Linear)."""
    if scale.dtype == torch.float32 and scale.is_contiguous():
        return scale.view(-1)
    return scale.float().reshape(-1).contiguous()


def scale_row(scale: torch.Tensor, n: int) -> torch.Tensor:
    """A weight's fp32 scale (per channel or per tensor) as the [1, N] row that `_scaled_mm`
    takes for row-wise scaling; a view of the stored per-channel scale (no copy, no launch)."""
    s = flat_scale(scale)
    return (s if s.numel() == n else s.expand(n).contiguous()).view(1, n)


def finish_linear(y: torch.Tensor, x: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    """fp32 GEMM result y [M, N] -> + bias (fp32), cast to out_dtype, reshaped to x's [..., N]:
    the common tail of the `*_reference` linears (and of their emulated fallbacks)."""
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*x.shape[:-1], y.shape[-1])
