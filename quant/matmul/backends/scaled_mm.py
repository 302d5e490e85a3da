"""The FP8 `torch._scaled_mm` backends.

- "scaled_mm": FP8 W8A8 through `torch._scaled_mm` with row-wise scales (per-token activation
  scale [M, 1], per-channel weight scale [1, N], bf16 out) and eager activation quantization.
  NVIDIA sm_89+ with e4m3fn weights; ROCm gfx942 (MI300) with e4m3fnuz weights, gfx950 and
  gfx12xx with e4m3fn weights.
- "scaled_mm_mxfp4": a seam only, never usable yet: Blackwell (sm_100/sm_120) runs MXFP4
  natively via `torch._scaled_mm` with float4_e2m1fn_x2 data and float8_e8m0fnu block scales in
  cuBLAS's swizzled layout; no such GPU here to test it on.
"""

from __future__ import annotations

import logging

import torch

from ...errors import BackendUnavailableError
from ...formats import QuantizedWeight, WeightFormat, fp8
from ...kernels import scale_row
from ..reference import reference_linear
from ..registry import Backend, DeviceInfo, register_backend

log = logging.getLogger(__name__)

# FP8 dtypes each GPU's tensor cores take: NVIDIA Ada/Hopper/Blackwell and AMD
# MI350/RDNA4 take OCP e4m3fn; MI300 (gfx942) only e4m3fnuz.
_SCALED_MM_ROCM = {
    "gfx942": torch.float8_e4m3fnuz,
    "gfx950": torch.float8_e4m3fn,
    "gfx1200": torch.float8_e4m3fn,
    "gfx1201": torch.float8_e4m3fn,
}


def _scaled_mm_check(info: DeviceInfo, fmt: WeightFormat) -> tuple[bool, str]:
    if info.type != "cuda":
        return False, f"needs a CUDA/ROCm GPU, device is {info.describe()}"
    if not hasattr(torch, "_scaled_mm"):
        return False, f"this PyTorch ({torch.__version__}) has no torch._scaled_mm"
    dtype = fmt.dtype  # only FP8 formats (kind "fp8") are offered to this check
    if info.vendor == "amd":
        want = _SCALED_MM_ROCM.get(info.arch)
        if want is None:
            return False, f"{info.arch} has no FP8 matrix cores PyTorch uses"
        if dtype != want:
            hint = f"use format {_fp8_name(want)}"
            return False, f"{info.arch} FP8 matrix cores take {want}, weights are {dtype} ({hint})"
        return True, f"ROCm {info.arch} FP8 matrix cores via torch._scaled_mm (row-wise scales)"
    if info.capability is None or info.capability < (8, 9):
        return False, f"FP8 tensor cores need sm_89+, device is {info.arch}"
    if dtype != torch.float8_e4m3fn:
        return False, f"NVIDIA FP8 tensor cores take float8_e4m3fn, weights are {dtype}"
    return True, f"CUDA {info.arch} FP8 tensor cores via torch._scaled_mm (row-wise scales)"


scaled_mm_check = _scaled_mm_check  # public name for plug-ins that build on the same capability rule


def _fp8_name(dtype: torch.dtype) -> str:
    return "fp8_e4m3fnuz" if dtype == torch.float8_e4m3fnuz else "fp8_e4m3fn"


def scaled_mm_args(xq: torch.Tensor, x_scale: torch.Tensor, qw: QuantizedWeight) -> dict:
    """Arguments of torch._scaled_mm for a row-wise-scaled FP8 GEMM (kept apart so CPU tests can
    check shapes and layouts): a [M, K] row-major, b = weight.t() [K, N] column-major,
    scale_a [M, 1] fp32, scale_b [1, N] fp32, bf16 out (row-wise scaling requires bf16)."""
    return {
        "mat1": xq.contiguous(),
        "mat2": qw.qdata.t(),  # qdata [N, K] row-major -> [K, N] column-major, no copy
        "scale_a": x_scale.float().reshape(-1, 1).contiguous(),
        "scale_b": scale_row(qw.scale, qw.shape[0]),
        "out_dtype": torch.bfloat16,
    }


_ROWWISE_UNSUPPORTED: set[torch.device] = set()  # devices where row-wise _scaled_mm raised


def _scaled_mm_run(x, qw, bias, compute):
    n, k = qw.shape
    if n % 16 or k % 16:  # cuBLASLt/hipBLASLt FP8 needs both multiples of 16
        return reference_linear(x, qw, bias, compute)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty((*lead, n))
    # Eager activation quantization for now; fused kernels (quant/kernels) register above this.
    xq, xs = fp8.quantize_activation(x2, qw.qdata.dtype)
    a = scaled_mm_args(xq, xs, qw)
    out = None
    if x.device not in _ROWWISE_UNSUPPORTED:
        try:
            out = torch._scaled_mm(
                a["mat1"], a["mat2"], scale_a=a["scale_a"], scale_b=a["scale_b"], out_dtype=a["out_dtype"]
            )
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            # Row-wise scaling needs sm_90 CUTLASS kernels or cuBLASLt >= 12.9 (outer-vector
            # scales); builds without them raise. Fall back once per device, say so once.
            _ROWWISE_UNSUPPORTED.add(x.device)
            log.warning("torch._scaled_mm has no row-wise scaling here (%s); using unit-scale FP8 "
                        "GEMM with fp32 output and applying the scales after it", str(e).splitlines()[0])
    if out is None:
        one = torch.ones((), dtype=torch.float32, device=x.device)
        out = torch._scaled_mm(a["mat1"], a["mat2"], scale_a=one, scale_b=one, out_dtype=torch.float32)
        out = out.mul_(a["scale_a"]).mul_(a["scale_b"])
    out = out.to(x.dtype)
    if bias is not None:
        out += bias.to(x.dtype)
    return out.view(*lead, n)


def _blackwell_mxfp4_check(info: DeviceInfo, fmt: WeightFormat) -> tuple[bool, str]:
    return False, "not implemented yet (Blackwell MXFP4 via torch._scaled_mm: no such GPU to test on)"


def _not_implemented_run(x, qw, bias, compute):
    raise BackendUnavailableError("the Blackwell MXFP4 torch._scaled_mm backend is not implemented yet")


BACKENDS = (
    Backend(
        "scaled_mm",
        ("fp8",),
        ("w8a8",),
        _scaled_mm_run,
        _scaled_mm_check,
        priority=50,
        package="a PyTorch build with CUDA or ROCm",
        traced_run=_scaled_mm_run,  # already plain PyTorch ops
    ),
    Backend(
        "scaled_mm_mxfp4",
        ("mxfp4",),
        ("w4a4",),
        _not_implemented_run,
        _blackwell_mxfp4_check,
        priority=40,
        package="a Blackwell GPU and PyTorch >= 2.8",
    ),
)
for _b in BACKENDS:
    register_backend(_b)
del _b

__all__ = ["BACKENDS", "scaled_mm_args", "scaled_mm_check"]
