"""Triton: MXFP4 -> bf16/fp16 (or -> e4m3 with a per-row power-of-two scale) in one
memory-bound pass, for the dequantize-to-workspace GEMM paths (weights stay packed at rest; one
layer's 16-bit or 8-bit copy exists only while that layer runs)."""

import triton
import triton.language as tl

from ._tl_common import round_to_e4m3
from ._tl_mxfp4_gemm import _decode_tile


@triton.jit
def mxfp4_dequant_kernel(
    wq_ptr,
    ws_ptr,
    wsmax_ptr,
    out_ptr,
    N,
    K,
    stride_wn,
    stride_sn,
    stride_on,
    TO_FP8: tl.constexpr,
    EMULATE_CVT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    rkh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    rks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    p = tl.load(
        wq_ptr + rn64[:, None] * stride_wn + rkh[None, :],
        mask=n_ok[:, None] & (rkh < K // 2)[None, :],
        other=0,
    )
    s = tl.load(
        ws_ptr + rn64[:, None] * stride_sn + rks[None, :],
        mask=n_ok[:, None] & (rks < K // 32)[None, :],
        other=127,
    ).to(tl.int32)
    if TO_FP8:
        smax = tl.load(wsmax_ptr + rn, mask=n_ok, other=127).to(tl.int32)
        s = tl.maximum(s - smax[:, None] + 127, 0)  # 2**(s - s_max) <= 1: the row's scale goes outside
    w = _decode_tile(p, s, BLOCK_N, BLOCK_K)
    if TO_FP8 and EMULATE_CVT:
        w = round_to_e4m3(w, False)
    tl.store(
        out_ptr + rn64[:, None] * stride_on + rk[None, :],
        w.to(out_ptr.dtype.element_ty),
        mask=n_ok[:, None] & (rk < K)[None, :],
    )
