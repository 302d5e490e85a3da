"""Triton: block-FP8 GEMM that quantizes the activation tile as it loads it.

out[m, n] = sum_g (q_a[m, g] . q_w[n, g]) * s_a[m, g] * s_w[n] + bias[n]
with per-token-group activation scales (1 x BLOCK_K, BLOCK_K = 128 as in DeepGEMM / block-FP8
GEMMs) computed from the bf16 tile in registers, and FP8 weights with one scale per output
channel (or one per tensor). No separate quantization pass and no FP8 copy of x in HBM: the
kernel reads x in bf16 once per N-tile column and writes the output once, bias and dtype fused.
"""

import triton
import triton.language as tl

from ._tl_common import round_to_e4m3, store_tile, tile_rows_cols


@triton.jit
def fp8_gemm_act_quant_kernel(
    a_ptr,
    w_ptr,
    ws_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_cm,
    FP8_MAX: tl.constexpr,
    EPS: tl.constexpr,
    FNUZ: tl.constexpr,
    EMULATE_CVT: tl.constexpr,
    W_PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    rm, rn, m_ok, n_ok = tile_rows_cols(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a_s = tl.maximum(tl.max(tl.abs(a), axis=1), EPS) / FP8_MAX
        aq = tl.clamp(a * (1.0 / a_s)[:, None], -FP8_MAX, FP8_MAX)
        if EMULATE_CVT:
            aq = round_to_e4m3(aq, FNUZ)
        part = tl.dot(aq.to(w.dtype), w)
        acc += part * a_s[:, None]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if W_PER_CHANNEL:
        ws = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
        acc = acc * ws[None, :]
    else:
        acc = acc * tl.load(ws_ptr)
    store_tile(acc, bias_ptr, c_ptr, rm, rn, m_ok, n_ok, stride_cm, HAS_BIAS, False)
