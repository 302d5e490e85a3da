"""MXFP4-weight linear paths for GPUs without FP4 tensor cores (Triton), with references.

Weights as quant/formats/mxfp4.py stores them (OCP MX v1.0): codes uint8 [N, K/2] (two E2M1 codes per
byte, even element in the low nibble), scales uint8 E8M0 [N, K/32]. K must be a multiple of 32.

- `mxfp4_linear_w4a16`: decode in registers (hand-written), bf16 tensor cores.
- `mxfp4_linear_w4a16_dot_scaled`: the same through Triton's `tl.dot_scaled`.
- `mxfp4_linear_w4a8`: decode to e4m3 tiles, FP8 tensor cores, per-token FP8 activations.
"""

from __future__ import annotations

import torch

from ..constants import E2M1_VALUES
from . import can_run_triton, finish_linear, flat_rows, interpreting, triton_cdiv
from .fp8_quant import quantize_fp8_per_token, quantize_fp8_per_token_reference
from .launch import launch as triton_launch


def decode_mxfp4_reference(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes [N, K/2] + E8M0 scales [N, K/32] -> fp32 [N, K] (0xFF scales -> NaN, per the spec)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    vals = torch.stack((table[c & 15], table[c >> 4]), dim=-1).reshape(*codes.shape[:-1], -1)
    s = scales.to(torch.int32)
    sf = torch.where(s == 0, torch.full_like(s, 0x00400000), s << 23).view(torch.float32)
    sf = torch.where(s == 255, torch.full_like(sf, float("nan")), sf)
    return (vals.view(*vals.shape[:-1], -1, 32) * sf[..., None]).reshape(vals.shape)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); tuned on H100 (docs/benchmarks.md)
W4A16_CONFIG = (128, 128, 64, 8, 3)
DOT_SCALED_CONFIG = (128, 128, 64, 4, 4)
W4A8_CONFIG = (128, 128, 128, 4, 4)


def _launch(x2, codes, scales, bias, out, config, **extra):
    """(grid, the size and stride arguments in the GEMM kernels' order, their constexprs)."""
    m, k = x2.shape
    n = codes.shape[0]
    bm, bn, bk, warps, stages = config
    if interpreting():
        bm, bn, bk = min(bm, 32), min(bn, 32), min(bk, 64)
    grid = (triton_cdiv(m, bm) * triton_cdiv(n, bn),)
    sizes = (m, n, k, x2.stride(0), codes.stride(0), scales.stride(0), out.stride(0))
    constexprs = dict(
        HAS_BIAS=bias is not None,
        **extra,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=8,
        num_warps=warps,
        num_stages=stages,
    )
    return grid, sizes, constexprs


def _check(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    k = x.shape[-1]
    if k % 32 or codes.shape[-1] * 2 != k or scales.shape[-1] * 32 != k:
        raise ValueError(
            f"MXFP4 linear: input has K={k}, codes {tuple(codes.shape)}, scales {tuple(scales.shape)}; "
            "need codes [N, K/2] and scales [N, K/32] with K a multiple of 32"
        )


# ---------------------------------------------------------------- W4A16
def mxfp4_linear_w4a16_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    _check(x, codes, scales)
    w = decode_mxfp4_reference(codes, scales)
    a = flat_rows(x)
    # the kernel feeds the tensor cores x's own 16-bit values and the decoded weights in x's dtype
    wd = w.to(a.dtype).float() if a.dtype in (torch.bfloat16, torch.float16) else w
    return finish_linear(a.float() @ wd.t(), x, bias, out_dtype or x.dtype)


def mxfp4_linear_w4a16(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: tuple | None = None,
) -> torch.Tensor:
    return _w4a16(x, codes, scales, bias, out_dtype, config or W4A16_CONFIG, dot_scaled=False)


def _w4a16(x, codes, scales, bias, out_dtype, config, dot_scaled: bool) -> torch.Tensor:
    """The two W4A16 kernels (decode in registers / `tl.dot_scaled`) share their checks, their
    reference fallback, their operands and their launch; only the kernel and one constexpr differ."""
    _check(x, codes, scales)
    out_dtype = out_dtype or x.dtype
    if x.dtype not in (torch.bfloat16, torch.float16):
        # the kernels take 16-bit activations; the fallback rounds fp32 the same way, so both
        # paths give one result whether or not Triton runs here
        x = x.to(torch.bfloat16)
    if not can_run_triton(x.device):
        return mxfp4_linear_w4a16_reference(x, codes, scales, bias, out_dtype)
    from ._tl_mxfp4_gemm import mxfp4_w4a16_dot_scaled_kernel, mxfp4_w4a16_kernel

    x2 = flat_rows(x)
    out = torch.empty((x2.shape[0], codes.shape[0]), dtype=out_dtype, device=x.device)
    if dot_scaled:
        kernel = mxfp4_w4a16_dot_scaled_kernel
        extra = dict(A_FORMAT="bf16" if x2.dtype == torch.bfloat16 else "fp16")
    else:
        kernel, extra = mxfp4_w4a16_kernel, dict(INTERPRET=interpreting())
    grid, sizes, constexprs = _launch(x2, codes, scales, bias, out, config, **extra)
    args = (x2, codes, scales, bias if bias is not None else out, out, *sizes)
    triton_launch(kernel, grid, args, constexprs)
    return out.reshape(*x.shape[:-1], codes.shape[0])


def mxfp4_linear_w4a16_dot_scaled_reference(x, codes, scales, bias=None, out_dtype=None):
    return mxfp4_linear_w4a16_reference(x, codes, scales, bias, out_dtype)


def mxfp4_linear_w4a16_dot_scaled(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: tuple | None = None,
) -> torch.Tensor:
    return _w4a16(x, codes, scales, bias, out_dtype, config or DOT_SCALED_CONFIG, dot_scaled=True)


# ---------------------------------------------------------------- W4A8 (FP8 tensor cores)
def row_scale_max(scales: torch.Tensor) -> torch.Tensor:
    """Per output row, the largest E8M0 scale byte (uint8 [N]): the row's FP8 base exponent."""
    return scales.amax(dim=-1)


def mxfp4_linear_w4a8_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    _check(x, codes, scales)
    w8, base = mxfp4_to_fp8_reference(codes, scales)  # base [N, 1]: s_max >= 1 for a nonzero block
    q, s = quantize_fp8_per_token_reference(flat_rows(x), torch.float8_e4m3fn)
    y = (q.float() @ w8.float().t()) * s * base.reshape(1, -1)
    return finish_linear(y, x, bias, out_dtype or x.dtype)


def mxfp4_linear_w4a8(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: tuple | None = None,
    row_smax: torch.Tensor | None = None,
) -> torch.Tensor:
    """`row_smax` (= row_scale_max(scales)) may be passed in when cached with the weight."""
    _check(x, codes, scales)
    out_dtype = out_dtype or x.dtype
    if not can_run_triton(x.device):
        return mxfp4_linear_w4a8_reference(x, codes, scales, bias, out_dtype)
    from ._tl_mxfp4_gemm import mxfp4_w4a8_kernel

    q, s = quantize_fp8_per_token(flat_rows(x), torch.float8_e4m3fn)
    smax = row_smax if row_smax is not None else row_scale_max(scales)
    out = torch.empty((q.shape[0], codes.shape[0]), dtype=out_dtype, device=x.device)
    config = config or W4A8_CONFIG
    grid, sizes, constexprs = _launch(q, codes, scales, bias, out, config, EMULATE_CVT=interpreting())
    args = (q, s, codes, scales, smax, bias if bias is not None else out, out, *sizes)
    triton_launch(mxfp4_w4a8_kernel, grid, args, constexprs)
    return out.reshape(*x.shape[:-1], codes.shape[0])


# ---------------------------------------------------------------- dequantize to a workspace + cuBLAS
# At diffusion sizes (thousands of tokens) the GEMM is compute-bound and Hopper has no FP4 tensor
# cores, so the fastest W4A16 is: decode the packed weight once per call into a transient 16-bit
# workspace (one memory-bound pass, ~2.5 bytes/weight) and let cuBLAS run the bf16 GEMM. The same
# trick into e4m3 + a per-row power-of-two scale feeds the FP8 row-wise GEMM (MXFP4 storage, FP8
# tensor-core compute). Weights stay MXFP4 at rest; one layer's copy lives only during its GEMM.


def mxfp4_dequantize_reference(
    codes: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16
) -> torch.Tensor:
    return decode_mxfp4_reference(codes, scales).to(dtype)


def _dequant_launch(codes, scales, out, smax, to_fp8: bool):
    from ._tl_mxfp4_dequant import mxfp4_dequant_kernel

    n, k = out.shape
    bn, bk = (16, 64) if interpreting() else (32, 256)
    grid = (triton_cdiv(n, bn), triton_cdiv(k, bk))
    args = (codes, scales, smax if smax is not None else scales, out, n, k)
    args += (codes.stride(0), scales.stride(0), out.stride(0))
    constexprs = dict(TO_FP8=to_fp8, EMULATE_CVT=interpreting(), BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    triton_launch(mxfp4_dequant_kernel, grid, args, constexprs)
    return out


def mxfp4_dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """codes [N, K/2] + scales [N, K/32] -> [N, K] in dtype (Triton, one pass)."""
    if not can_run_triton(codes.device):
        return mxfp4_dequantize_reference(codes, scales, dtype)
    out = torch.empty((codes.shape[0], codes.shape[1] * 2), dtype=dtype, device=codes.device)
    return _dequant_launch(codes, scales, out, None, False)


def mxfp4_to_fp8_reference(codes, scales, row_smax=None) -> tuple[torch.Tensor, torch.Tensor]:
    smax = (row_smax if row_smax is not None else row_scale_max(scales)).to(torch.int32)
    rel = (scales.to(torch.int32) - smax[:, None] + 127).clamp_min(0).to(torch.uint8)
    w8 = decode_mxfp4_reference(codes, rel).to(torch.float8_e4m3fn)
    return w8, (smax << 23).view(torch.float32).reshape(-1, 1)


def mxfp4_to_fp8(codes: torch.Tensor, scales: torch.Tensor, row_smax: torch.Tensor | None = None):
    """MXFP4 -> (e4m3 [N, K], fp32 per-row scale [N, 1] = 2**(s_max - 127)): exact while a row's
    block scales span <= 8 binades (smaller blocks lose low bits to e4m3 subnormals)."""
    smax = row_smax if row_smax is not None else row_scale_max(scales)
    if not can_run_triton(codes.device):
        return mxfp4_to_fp8_reference(codes, scales, smax)
    out = torch.empty((codes.shape[0], codes.shape[1] * 2), dtype=torch.float8_e4m3fn, device=codes.device)
    _dequant_launch(codes, scales, out, smax, True)
    return out, (smax.to(torch.int32) << 23).view(torch.float32).reshape(-1, 1)


def mxfp4_linear_w4a16_dequant_reference(x, codes, scales, bias=None, out_dtype=None):
    return mxfp4_linear_w4a16_reference(x, codes, scales, bias, out_dtype)


def mxfp4_linear_w4a16_dequant(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    _check(x, codes, scales)
    out_dtype = out_dtype or x.dtype
    cdt = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    w = mxfp4_dequantize(codes, scales, cdt)
    y = torch.nn.functional.linear(x.to(cdt), w, None if bias is None else bias.to(cdt))
    return y if y.dtype == out_dtype else y.to(out_dtype)


def mxfp4_linear_w4a8_dequant_reference(x, codes, scales, bias=None, out_dtype=None):
    return mxfp4_linear_w4a8_reference(x, codes, scales, bias, out_dtype)


def mxfp4_linear_w4a8_dequant(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    row_smax: torch.Tensor | None = None,
) -> torch.Tensor:
    from .fp8_gemm import fp8_linear_rowwise

    _check(x, codes, scales)
    w8, ws = mxfp4_to_fp8(codes, scales, row_smax)
    return fp8_linear_rowwise(x, w8, ws, bias, out_dtype or x.dtype)
