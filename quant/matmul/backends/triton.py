"""The Triton kernels (quant/kernels) as matmul backends; the registry imports this module lazily.

- "triton_fp8": FP8 W8A8 on GPUs with FP8 tensor cores; per shape (tuning.py) either the Triton
  per-token quantization + `torch._scaled_mm` row-wise, or the fused block-FP8 Triton GEMM; for a
  few tokens, the weights-only in-register GEMM of "triton_fp8_w8a16" (one launch).
- "triton_mxfp4": MXFP4 W4A16 on NVIDIA sm_80+: per shape (tuning.py) decoded into a transient
  bf16 workspace for cuBLAS (large M) or decoded in registers by a Triton GEMM (small M).
- "triton_mxfp4_w4a8": MXFP4 weights on FP8 tensor cores (sm_89+), when compute="w4a8" is asked.
- "triton_fp8_w8a16": FP8 weights only (compute "w8a16", e.g. a `weights-only:` layer): per shape
  (tuning.py) the weight dequantized to the activation dtype in one Triton pass, then cuBLAS, or
  (few tokens) one Triton GEMM that widens the FP8 tiles in registers.
Registration needs no Triton import; `check` says whether Triton is there. The kernel modules are
imported at the top: they import no Triton themselves (their `_tl_*` sources do, when a kernel
first runs), and an import statement in a run function would cost every Linear call ~1 us of host
time (small layers are host-bound).
"""

from __future__ import annotations

import torch

from ...formats import WeightFormat
from ...kernels import fp8_dequant, fp8_gemm, mxfp4_gemm, triton_available
from ...kernels import ops as _kernel_ops  # noqa: F401  (defines the kernels' torch.library ops)
from ...kernels.tuning import choose_fp8_path, choose_fp8_w8a16_path, choose_mxfp4_path
from ..registry import Backend, DeviceInfo, register_backend
from .scaled_mm import scaled_mm_check


def _need_triton() -> tuple[bool, str]:
    if not triton_available():
        return False, "Triton is not installed (pip install triton)"
    return True, ""


def _fp8_check(info: DeviceInfo, fmt: WeightFormat) -> tuple[bool, str]:
    ok, why = _need_triton()
    if not ok:
        return ok, why
    ok, why = scaled_mm_check(info, fmt)
    if not ok:
        return ok, why
    return True, (
        f"{info.arch} FP8 tensor cores: Triton per-token activation quantization + "
        "torch._scaled_mm row-wise, or the fused block-FP8 Triton GEMM, per shape"
    )


def _fp8_run(x, qw, bias, compute):
    n, k = qw.shape
    m = x.numel() // k if k else 0
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    path = choose_fp8_path(m, n, k)
    if path == "in_registers":  # few tokens: weights-only math, one launch (tuning.py)
        return fp8_dequant.fp8_linear_w8a16_fused(x, qw.qdata, qw.scale, bias)
    if path == "fused":
        return fp8_gemm.fp8_linear_act_fused(x, qw.qdata, qw.scale, bias)
    return fp8_gemm.fp8_linear_rowwise(x, qw.qdata, qw.scale, bias)


def _fp8_traced(x, qw, bias, compute):
    return fp8_gemm.fp8_linear_traceable(x, qw.qdata, qw.scale, bias)


def _fp8_w8a16_check(info: DeviceInfo, fmt: WeightFormat) -> tuple[bool, str]:
    ok, why = _need_triton()
    if not ok:
        return ok, why
    if info.type != "cuda":
        return False, f"needs a CUDA/ROCm GPU, device is {info.describe()}"
    if fmt.dtype == torch.float8_e4m3fnuz and info.vendor != "amd":
        return False, "Triton has float8_e4m3fnuz only on ROCm"
    return True, f"{info.arch}: FP8 weight dequantized to the activation dtype by Triton, then a 16-bit GEMM"


def _fp8_w8a16_run(x, qw, bias, compute):
    n, k = qw.shape
    if x.numel() == 0:
        return x.new_empty((*x.shape[:-1], n))
    fused = choose_fp8_w8a16_path(x.numel() // k, n, k) == "fused"
    run = fp8_dequant.fp8_linear_w8a16_fused if fused else fp8_dequant.fp8_linear_w8a16
    return run(x, qw.qdata, qw.scale, bias)


def _mxfp4_check_for(min_cap: tuple[int, int], what: str):
    def check(info: DeviceInfo, fmt: WeightFormat) -> tuple[bool, str]:
        ok, why = _need_triton()
        if not ok:
            return ok, why
        if info.type != "cuda" or info.vendor != "nvidia":
            return False, f"Triton MXFP4 kernels are built for NVIDIA GPUs, device is {info.describe()}"
        if info.capability is None or info.capability < min_cap:
            return False, f"{what} needs sm_{min_cap[0]}{min_cap[1]}+, device is {info.arch}"
        return True, f"{info.arch}: MXFP4 weights decoded in registers by a Triton GEMM ({what})"

    return check


def _mxfp4_run(x, qw, bias, compute):
    n, k = qw.shape
    if x.numel() == 0:
        return x.new_empty((*x.shape[:-1], n))
    dequant = choose_mxfp4_path(x.numel() // k, n, k) == "dequant"
    if compute == "w4a8":
        fn = mxfp4_gemm.mxfp4_linear_w4a8_dequant if dequant else mxfp4_gemm.mxfp4_linear_w4a8
    else:
        fn = mxfp4_gemm.mxfp4_linear_w4a16_dequant if dequant else mxfp4_gemm.mxfp4_linear_w4a16
    return fn(x, qw.qdata, qw.scale, bias)


BACKENDS = (
    Backend(
        "triton_fp8",
        ("fp8",),
        ("w8a8",),
        _fp8_run,
        _fp8_check,
        priority=60,
        package="triton (and a GPU with FP8 tensor cores)",
        traced_run=_fp8_traced,  # the row-wise path in plain ops: Inductor fuses the quantization
    ),
    Backend(
        "triton_fp8_w8a16",
        ("fp8",),
        ("w8a16",),
        _fp8_w8a16_run,
        _fp8_w8a16_check,
        priority=55,
        package="triton",
    ),
    Backend(
        "triton_mxfp4",
        ("mxfp4",),
        ("w4a16",),
        _mxfp4_run,
        _mxfp4_check_for((8, 0), "bf16 tensor cores"),
        priority=60,
        package="triton",
    ),
    Backend(
        "triton_mxfp4_w4a8",
        ("mxfp4",),
        ("w4a8",),
        _mxfp4_run,
        _mxfp4_check_for((8, 9), "FP8 tensor cores"),
        priority=55,
        package="triton",
    ),
)


for _b in BACKENDS:
    register_backend(_b)
del _b
