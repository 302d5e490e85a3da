"""Triton: MXFP4-weight GEMMs for GPUs without FP4 tensor cores (Hopper, Ada, MI300).

Weights stay packed in HBM (codes uint8 [N, K/2], even element in the low nibble; E8M0 scales
uint8 [N, K/32]) and are decoded in registers, tile by tile:
- `mxfp4_w4a16_kernel`: decode to bf16/fp16 x block scale, bf16 tensor cores (hand-written decode).
- `mxfp4_w4a16_dot_scaled_kernel`: the same product through `tl.dot_scaled` (Triton's own
  e2m1 x e8m0 path; on Hopper it also decodes in registers).
- `mxfp4_w4a8_kernel`: decode to e4m3 tiles for FP8 tensor cores. The block scales of a row are
  folded relative to the row's largest one (2**(s - s_max) <= 1, exact in e4m3 while
  s_max - s <= 8), the row's 2**s_max and the per-token activation scale are applied once at the end.
"""

import triton
import triton.language as tl

from ._tl_common import decode_e2m1, e8m0_to_f32, round_to_e4m3, store_tile, tile_rows_cols


@triton.jit
def _decode_tile(p, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """packed [BN, BK/2] uint8 + scales [BN, BK/32] uint8 -> fp32 [BN, BK] weights."""
    p = p.to(tl.int32)
    w = tl.join(decode_e2m1(p & 15), decode_e2m1(p >> 4))  # [BN, BK/2, 2]: low nibble first
    w = tl.reshape(w, (BLOCK_N, BLOCK_K // 32, 32))
    w = w * e8m0_to_f32(s.to(tl.int32))[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def mxfp4_w4a16_kernel(
    a_ptr,
    wq_ptr,
    ws_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_sn,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    rm, rn, m_ok, n_ok = tile_rows_cols(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    rkh = tl.arange(0, BLOCK_K // 2)
    rks = tl.arange(0, BLOCK_K // 32)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    p_ptrs = wq_ptr + rn.to(tl.int64)[:, None] * stride_wn + rkh[None, :]
    s_ptrs = ws_ptr + rn.to(tl.int64)[:, None] * stride_sn + rks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=m_ok[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
        p = tl.load(p_ptrs, mask=n_ok[:, None] & ((k0 // 2 + rkh) < K // 2)[None, :], other=0)
        s = tl.load(s_ptrs, mask=n_ok[:, None] & ((k0 // 32 + rks) < K // 32)[None, :], other=127)
        w = _decode_tile(p, s, BLOCK_N, BLOCK_K).to(a.dtype)
        if INTERPRET:
            # Triton 3.8's interpreter computes bf16 tl.dot wrongly; the exact fp32 product of
            # the same bf16 values is what the tensor cores compute (fp32 accumulation).
            acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
        a_ptrs += BLOCK_K
        p_ptrs += BLOCK_K // 2
        s_ptrs += BLOCK_K // 32
    store_tile(acc, bias_ptr, c_ptr, rm, rn, m_ok, n_ok, stride_cm, HAS_BIAS, False)


@triton.jit
def mxfp4_w4a16_dot_scaled_kernel(
    a_ptr,
    wq_ptr,
    ws_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_sn,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    A_FORMAT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    rm, rn, m_ok, n_ok = tile_rows_cols(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    rkh = tl.arange(0, BLOCK_K // 2)
    rks = tl.arange(0, BLOCK_K // 32)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    p_ptrs = wq_ptr + rn.to(tl.int64)[None, :] * stride_wn + rkh[:, None]  # [BK/2, BN], K-packed
    s_ptrs = ws_ptr + rn.to(tl.int64)[:, None] * stride_sn + rks[None, :]  # [BN, BK/32]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=m_ok[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
        p = tl.load(p_ptrs, mask=((k0 // 2 + rkh) < K // 2)[:, None] & n_ok[None, :], other=0)
        s = tl.load(s_ptrs, mask=n_ok[:, None] & ((k0 // 32 + rks) < K // 32)[None, :], other=127)
        acc = tl.dot_scaled(a, None, A_FORMAT, p, s, "e2m1", acc)
        a_ptrs += BLOCK_K
        p_ptrs += BLOCK_K // 2
        s_ptrs += BLOCK_K // 32
    store_tile(acc, bias_ptr, c_ptr, rm, rn, m_ok, n_ok, stride_cm, HAS_BIAS, False)


@triton.jit
def mxfp4_w4a8_kernel(
    aq_ptr,
    as_ptr,
    wq_ptr,
    ws_ptr,
    wsmax_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_sn,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    EMULATE_CVT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    rm, rn, m_ok, n_ok = tile_rows_cols(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    rkh = tl.arange(0, BLOCK_K // 2)
    rks = tl.arange(0, BLOCK_K // 32)
    smax = tl.load(wsmax_ptr + rn, mask=n_ok, other=127).to(tl.int32)
    a_ptrs = aq_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    p_ptrs = wq_ptr + rn.to(tl.int64)[:, None] * stride_wn + rkh[None, :]
    s_ptrs = ws_ptr + rn.to(tl.int64)[:, None] * stride_sn + rks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=m_ok[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
        p = tl.load(p_ptrs, mask=n_ok[:, None] & ((k0 // 2 + rkh) < K // 2)[None, :], other=0)
        s = tl.load(s_ptrs, mask=n_ok[:, None] & ((k0 // 32 + rks) < K // 32)[None, :], other=0)
        # relative scale 2**(s - s_max) as E8M0 byte s - s_max + 127 (<= 127, so <= 1.0)
        rel = tl.maximum(s.to(tl.int32) - smax[:, None] + 127, 0)
        w = _decode_tile(p, rel, BLOCK_N, BLOCK_K)
        if EMULATE_CVT:
            w = round_to_e4m3(w, False)
        acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)
        a_ptrs += BLOCK_K
        p_ptrs += BLOCK_K // 2
        s_ptrs += BLOCK_K // 32
    a_s = tl.load(as_ptr + rm, mask=m_ok, other=0.0)
    acc = acc * a_s[:, None] * e8m0_to_f32(smax)[None, :]
    store_tile(acc, bias_ptr, c_ptr, rm, rn, m_ok, n_ok, stride_cm, HAS_BIAS, False)
