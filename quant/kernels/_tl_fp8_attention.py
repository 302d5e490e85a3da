"""Triton sources of the 8-bit attention kernels. Imported only when a kernel runs;
quant/kernels/fp8_attention.py holds the launcher and the explanation of the scheme."""

import triton
import triton.language as tl

from ._tl_common import round_to_e4m3


@triton.jit
def _to_fp8(x, INTERP: tl.constexpr):
    # x is fp32 and already within ±448. Under TRITON_INTERPRET=1 (INTERP) Triton's fp32->fp8 cast does
    # not carry a mantissa round-up into the exponent (7.93 -> 4.0), so round to e4m3 (nearest, ties
    # to even, subnormals included) by hand first; the cast of the rounded value is then exact. On
    # the GPU the hardware cast (cvt.rn.satfinite) is already right and this costs nothing.
    if INTERP:
        x = round_to_e4m3(x, False)
    return x.to(tl.float8e4nv)


@triton.jit
def _round_bf16(x):
    # fp32 -> nearest-even bf16 value, still fp32: the interpreter's own cast truncates
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _quantize_rows(x, QK_INT8: tl.constexpr, INTERP: tl.constexpr):
    """Per-row symmetric quantization of an fp32 tile: (codes, scale per row)."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-20)
    if QK_INT8:
        # round half up (floor(x + 0.5)): the reference does the same
        codes = tl.floor(x * (127.0 / amax)[:, None] + 0.5).to(tl.int8)
        return codes, amax / 127.0
    else:
        codes = _to_fp8(tl.clamp(x * (448.0 / amax)[:, None], -448.0, 448.0), INTERP)
        return codes, amax / 448.0


@triton.jit
def _quantize_tile(x, QK_INT8: tl.constexpr, INTERP: tl.constexpr):
    """One scale for the whole fp32 tile: (codes, scalar scale)."""
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-20)
    if QK_INT8:
        codes = tl.floor(x * (127.0 / amax) + 0.5).to(tl.int8)
        return codes, amax / 127.0
    else:
        codes = _to_fp8(tl.clamp(x * (448.0 / amax), -448.0, 448.0), INTERP)
        return codes, amax / 448.0


@triton.jit
def quant_kv_kernel(
    k_ptr, v_ptr, kmean_ptr, kbal_ptr, k8_ptr, ks_ptr, v8_ptr, vs_ptr,
    stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    H, LK, LPAD, NBLK,
    D: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr, V_FP8: tl.constexpr,
    K_TOKEN: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    valid = (offs_n < LK)[:, None]
    k = tl.load(
        k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :],
        mask=valid, other=0.0,
    ).to(tl.float32)  # fmt: skip
    mu = tl.load(kmean_ptr + pid_bh * D + offs_d)
    bal = tl.load(kbal_ptr + pid_bh * D + offs_d)
    k = tl.where(valid, (k - mu[None, :]) * bal[None, :], 0.0)
    # padded rows (offs_n >= LK) are written as zeros: the forward reads whole blocks
    if K_TOKEN:
        k8, ks = _quantize_rows(k, QK_INT8, INTERP)
        tl.store(ks_ptr + pid_bh * LPAD + offs_n, ks)
    else:
        k8, ks1 = _quantize_tile(k, QK_INT8, INTERP)
        tl.store(ks_ptr + pid_bh * NBLK + pid_n, ks1)
    tl.store(k8_ptr + pid_bh * LPAD * D + offs_n[:, None] * D + offs_d[None, :], k8)
    if V_FP8:
        v = tl.load(
            v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :],
            mask=valid, other=0.0,
        ).to(tl.float32)  # fmt: skip
        vmax = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-20)  # [D]: per channel in this block
        v8 = _to_fp8(tl.clamp(v * (448.0 / vmax)[None, :], -448.0, 448.0), INTERP)
        # transposed store: [B*H, D, LPAD], tokens contiguous (the K-major operand of P·V)
        tl.store(v8_ptr + pid_bh * D * LPAD + offs_d[:, None] * LPAD + offs_n[None, :], tl.trans(v8))
        tl.store(vs_ptr + (pid_bh * NBLK + pid_n) * D + offs_d, vmax / 448.0)


@triton.jit
def _attn_block(
    acc, l_i, m_i, q8, sq, start_n, pid_bh,
    k8_ptr, ks_ptr, v_ptr, vs_ptr, stride_vb, stride_vh, stride_vl, b, h,
    LK, LPAD, NBLK,
    D: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr, V_FP8: tl.constexpr,
    K_TOKEN: tl.constexpr, MASK: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    # K block loaded as [D, BLOCK_N] from the [L, D] buffer: the K-major B operand of the MMA
    kt = tl.load(k8_ptr + pid_bh * LPAD * D + offs_n[None, :] * D + offs_d[:, None])
    if K_TOKEN:
        ks = tl.load(ks_ptr + pid_bh * LPAD + offs_n)
        if QK_INT8:
            qk_i = tl.dot(q8, kt)  # int32, |qk| <= 127*127*D < 2**22 for D <= 256
            # int32 -> fp32 by the 1.5*2**23 trick (an integer add and a float add, both full rate)
            qk = (qk_i + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        else:
            qk = tl.dot(q8, kt)
        s = qk * ks[None, :]
        if MASK:
            s = tl.where((offs_n < LK)[None, :], s, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(s, axis=1) * sq)
        p = tl.math.exp2(s * sq[:, None] - (m_ij - 8.8)[:, None])
    else:
        # one K scale per block: it joins Q's row scale, so each logit costs one FMA
        c = sq * tl.load(ks_ptr + pid_bh * NBLK + start_n // BLOCK_N)
        if QK_INT8:
            # f = 1.5*2**23 + qk exactly; the offset is folded into the row bias below (the
            # bias's rounding error is the same for the whole row, which softmax ignores)
            f = (tl.dot(q8, kt) + 0x4B400000).to(tl.float32, bitcast=True)
            off = 12582912.0
        else:
            f = tl.dot(q8, kt)
            off = 0.0
        if MASK:
            f = tl.where((offs_n < LK)[None, :], f, float("-inf"))
        m_ij = tl.maximum(m_i, (tl.max(f, axis=1) - off) * c)
        p = tl.math.exp2(f * c[:, None] - (off * c + m_ij - 8.8)[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if V_FP8:
        vt = tl.load(v_ptr + pid_bh * D * LPAD + offs_d[:, None] * LPAD + offs_n[None, :])
        pv = tl.dot(_to_fp8(p, INTERP), tl.trans(vt))
        vs = tl.load(vs_ptr + (pid_bh * NBLK + start_n // BLOCK_N) * D + offs_d)
        acc = acc * alpha[:, None] + pv * vs[None, :]
    else:
        v_ptrs = v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :]
        v = tl.load(v_ptrs, mask=(offs_n < LK)[:, None], other=0.0) if MASK else tl.load(v_ptrs)
        acc = acc * alpha[:, None]
        # INTERP: the interpreter's bf16 dot and fp32->bf16 cast are wrong (triton 3.8): round P
        # to bf16 by hand (nearest even) and multiply in fp32, which is exact for bf16 values
        acc = tl.dot(_round_bf16(p), v.to(tl.float32), acc) if INTERP else tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij


@triton.jit
def attn_fwd_kernel(
    q_ptr, qbal_ptr, k8_ptr, ks_ptr, v_ptr, vs_ptr, o_ptr,
    stride_qb, stride_qh, stride_ql, stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    H, LQ, LK, LPAD, NBLK, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr,
    V_FP8: tl.constexpr, K_TOKEN: tl.constexpr, WARP_SPEC: tl.constexpr, INTERP: tl.constexpr,
    OUT_BF16: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = (offs_m < LQ)[:, None]
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
        mask=row_ok, other=0.0,
    ).to(tl.float32)  # fmt: skip
    q = q * tl.load(qbal_ptr + pid_bh * D + offs_d)[None, :]  # 1/s per channel (K got s)
    q8, sq = _quantize_rows(q, QK_INT8, INTERP)
    sq = sq * qk_scale  # per row: Q's scale × softmax scale × log2(e)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    n_full = (LK // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPEC):
        acc, l_i, m_i = _attn_block(
            acc, l_i, m_i, q8, sq, start_n, pid_bh,
            k8_ptr, ks_ptr, v_ptr, vs_ptr, stride_vb, stride_vh, stride_vl, b, h,
            LK, LPAD, NBLK, D, BLOCK_N, QK_INT8, V_FP8, K_TOKEN, False, INTERP,
        )  # fmt: skip
    if n_full < LK:  # the one partial block, masked
        acc, l_i, m_i = _attn_block(
            acc, l_i, m_i, q8, sq, n_full, pid_bh,
            k8_ptr, ks_ptr, v_ptr, vs_ptr, stride_vb, stride_vh, stride_vl, b, h,
            LK, LPAD, NBLK, D, BLOCK_N, QK_INT8, V_FP8, K_TOKEN, True, INTERP,
        )  # fmt: skip
    out = acc / l_i[:, None]
    if INTERP and OUT_BF16:
        out = _round_bf16(out)
    tl.store(
        o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty), mask=row_ok,
    )  # fmt: skip


@triton.jit
def stats_kernel(
    q_ptr, k_ptr, v_ptr, part_ptr,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    H, LQ, LK, NCHUNK, CHUNK,
    D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, BALANCE: tl.constexpr, QKV: tl.constexpr,
):  # fmt: skip
    """Partial per-channel statistics over one chunk of tokens of one (batch, head): sum of K,
    and with BALANCE min/max of K and amax|Q|. Written to part[bh, chunk, 4, DP]; the launcher
    finishes the (short) reduction over chunks. One read of Q and K instead of PyTorch's three
    strided reductions.
    QKV (the cuDNN FP8 pre-pass, quant/kernels/qkv_fp8.py) also reads V (K's length) for amax|V|
    and always takes K's min/max and amax|Q|, which its scales need balanced or not: part is then
    [bh, chunk, 5, DP]. DP is D rounded up to a power of two; the extra channels read as zeros."""
    NPART: tl.constexpr = 5 if QKV else 4
    EXTREMES: tl.constexpr = BALANCE or QKV
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, DP)
    d_ok = (offs_d < D)[None, :]
    # elementwise [BLOCK, DP] accumulators, reduced over rows once at the end: a reduction across
    # threads on every step would synchronise the warps once per BLOCK rows and keep the loads
    # far from the memory bandwidth
    ksum = tl.zeros([BLOCK, DP], tl.float32)
    kmin = tl.full([BLOCK, DP], float("inf"), tl.float32)
    kmax = tl.full([BLOCK, DP], float("-inf"), tl.float32)
    qabs = tl.zeros([BLOCK, DP], tl.float32)
    vabs = tl.zeros([BLOCK, DP], tl.float32)
    # the loop bounds are plain arguments (not program ids): Triton 3.6's interpreter cannot
    # iterate a range whose bounds are tensors
    for i in range(0, CHUNK, BLOCK):
        offs = pid_c * CHUNK + i + tl.arange(0, BLOCK)
        okk = (offs < LK)[:, None]
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs[:, None] * stride_kl + offs_d[None, :],
                    mask=okk & d_ok, other=0.0).to(tl.float32)  # fmt: skip
        ksum += k
        if EXTREMES:
            kmin = tl.minimum(kmin, tl.where(okk, k, float("inf")))
            kmax = tl.maximum(kmax, tl.where(okk, k, float("-inf")))
            q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs[:, None] * stride_ql + offs_d[None, :],
                        mask=(offs < LQ)[:, None] & d_ok, other=0.0).to(tl.float32)  # fmt: skip
            qabs = tl.maximum(qabs, tl.abs(q))
        if QKV:
            v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs[:, None] * stride_vl + offs_d[None, :],
                        mask=okk & d_ok, other=0.0).to(tl.float32)  # fmt: skip
            vabs = tl.maximum(vabs, tl.abs(v))
    base = part_ptr + (pid_bh * NCHUNK + pid_c) * NPART * DP
    tl.store(base + offs_d, tl.sum(ksum, axis=0))
    tl.store(base + DP + offs_d, tl.min(kmin, axis=0))
    tl.store(base + 2 * DP + offs_d, tl.max(kmax, axis=0))
    tl.store(base + 3 * DP + offs_d, tl.max(qabs, axis=0))
    if QKV:
        tl.store(base + 4 * DP + offs_d, tl.max(vabs, axis=0))


@triton.jit
def balance_factor(qabs, kabs):
    """s = sqrt(amax|Q| / amax|K − mean|) per channel, 1 where either is 0, clamped to [1e-4, 1e4]
    (quant/kernels/fp8_attention.py's `balance_factors` is the PyTorch twin). IEEE-rounded divide
    and square root: the GPU then matches PyTorch bit for bit, at no cost for D values."""
    ok = (kabs > 0) & (qabs > 0)
    s = tl.where(ok, tl.sqrt_rn(tl.math.div_rn(qabs, tl.maximum(kabs, 1e-30))), 1.0)
    return tl.minimum(tl.maximum(s, 1e-4), 1e4)


@triton.jit
def stats_finish_kernel(
    part_ptr, mean_ptr, qbal_ptr, kbal_ptr, NCHUNK, LK,
    D: tl.constexpr, SMOOTH: tl.constexpr, BALANCE: tl.constexpr,
):  # fmt: skip
    """Reduce stats_kernel's partials over chunks for one (batch, head) and write K's mean and
    the balancing factors 1/s (for Q) and s (for K), s = sqrt(amax|Q| / amax|K − mean|). One
    launch instead of a dozen small PyTorch ops (the Z-Image call is short enough to feel them)."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, D)
    ksum = tl.zeros([D], tl.float32)
    kmin = tl.full([D], float("inf"), tl.float32)
    kmax = tl.full([D], float("-inf"), tl.float32)
    qabs = tl.zeros([D], tl.float32)
    for c in range(0, NCHUNK):
        base = part_ptr + (pid * NCHUNK + c) * 4 * D
        ksum += tl.load(base + offs_d)
        kmin = tl.minimum(kmin, tl.load(base + D + offs_d))
        kmax = tl.maximum(kmax, tl.load(base + 2 * D + offs_d))
        qabs = tl.maximum(qabs, tl.load(base + 3 * D + offs_d))
    mean = ksum / LK if SMOOTH else tl.zeros([D], tl.float32)
    s = tl.full([D], 1.0, tl.float32)
    if BALANCE:
        s = balance_factor(qabs, tl.maximum(kmax - mean, mean - kmin))
    tl.store(mean_ptr + pid * D + offs_d, mean)
    tl.store(qbal_ptr + pid * D + offs_d, tl.math.div_rn(1.0, s))
    tl.store(kbal_ptr + pid * D + offs_d, s)
