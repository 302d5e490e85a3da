"""Triton: FP8-weight GEMM with 16-bit activations (W8A16), the weight widened in registers.

out[m, n] = (sum_k x[m, k] * q[n, k]) * s[n] + bias[n]: each FP8 weight tile is loaded as one byte
per element and widened to the activation dtype (exact: every e4m3 value is a bf16/fp16 value),
the scale applied once to the fp32 accumulator. For few tokens the GEMM is bound by reading the
weight, so reading one byte instead of two (and launching one kernel instead of a dequantization
pass plus cuBLAS) is what makes it faster than the workspace path.
"""

import triton
import triton.language as tl

from ._tl_common import store_tile, tile_rows_cols


@triton.jit
def fp8_w8a16_gemm_kernel(
    a_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_cm,
    PER_ROW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    rm, rn, m_ok, n_ok = tile_rows_cols(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if INTERPRET:
            # Triton 3.8's interpreter computes 16-bit tl.dot wrongly; the exact fp32 product of
            # the same values is what the tensor cores compute (fp32 accumulation).
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if PER_ROW:  # noqa: SIM108  (a constexpr branch: Triton compiles one side)
        acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0)[None, :]
    else:
        acc = acc * tl.load(s_ptr)
    # EMULATE_BF16: the interpreter's bf16 cast truncates where GPUs round to nearest even
    store_tile(acc, bias_ptr, c_ptr, rm, rn, m_ok, n_ok, stride_cm, HAS_BIAS, EMULATE_BF16)
