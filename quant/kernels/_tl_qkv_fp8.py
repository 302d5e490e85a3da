"""Triton sources of the cuDNN FP8 attention's pre-pass and of O's dequantization. Imported
only when a kernel runs; quant/kernels/qkv_fp8.py holds the launchers and says why the pass is
split as it is. The statistics pass itself is the 8-bit attention's `stats_kernel` (QKV=True)."""

import triton
import triton.language as tl

from ._tl_fp8_attention import _round_bf16, _to_fp8, balance_factor


@triton.jit
def qkv_finish_kernel(
    part_ptr, mean_ptr, qbal_ptr, kbal_ptr, amax_ptr, NCHUNK, LK, BH,
    DP: tl.constexpr, CB: tl.constexpr, SMOOTH: tl.constexpr, BALANCE: tl.constexpr,
):  # fmt: skip
    """One program per (batch, head): reduce stats_kernel's partials part[bh, chunk, 5, DP] over
    chunks (CB chunks per load) into K's mean, the balancing factors 1/s and s (each [BH, DP]),
    and the largest balanced |Q|, |K − mean|, |V| of this (batch, head): amax[3, BH]. A channel's
    balanced amax is amax|Q|/s and amax|K − mean|·s; fp32 rounding is monotonic, so these are
    exactly the amax of the balanced tensors that the reference computes element by element."""
    pid = tl.program_id(0)
    offs_c = tl.arange(0, CB)
    offs_d = tl.arange(0, DP)
    ksum = tl.zeros([DP], tl.float32)
    kmin = tl.full([DP], float("inf"), tl.float32)
    kmax = tl.full([DP], float("-inf"), tl.float32)
    qabs = tl.zeros([DP], tl.float32)
    vabs = tl.zeros([DP], tl.float32)
    for c0 in range(0, NCHUNK, CB):
        ok = (c0 + offs_c < NCHUNK)[:, None]
        base = part_ptr + ((pid * NCHUNK + c0 + offs_c) * 5 * DP)[:, None] + offs_d[None, :]
        ksum += tl.sum(tl.load(base, mask=ok, other=0.0), axis=0)
        kmin = tl.minimum(kmin, tl.min(tl.load(base + DP, mask=ok, other=float("inf")), axis=0))
        kmax = tl.maximum(kmax, tl.max(tl.load(base + 2 * DP, mask=ok, other=float("-inf")), axis=0))
        qabs = tl.maximum(qabs, tl.max(tl.load(base + 3 * DP, mask=ok, other=0.0), axis=0))
        vabs = tl.maximum(vabs, tl.max(tl.load(base + 4 * DP, mask=ok, other=0.0), axis=0))
    mean = tl.math.div_rn(ksum, tl.full([DP], LK, tl.float32)) if SMOOTH else tl.zeros([DP], tl.float32)
    kabs = tl.maximum(kmax - mean, mean - kmin)  # amax|K − mean|, exactly (monotonic rounding)
    if BALANCE:
        s = balance_factor(qabs, kabs)
        inv_s = tl.math.div_rn(tl.full([DP], 1.0, tl.float32), s)
        qabs = qabs * inv_s
        kabs = kabs * s
    else:
        s = tl.full([DP], 1.0, tl.float32)
        inv_s = s
    tl.store(mean_ptr + pid * DP + offs_d, mean)
    tl.store(qbal_ptr + pid * DP + offs_d, inv_s)
    tl.store(kbal_ptr + pid * DP + offs_d, s)
    tl.store(amax_ptr + pid, tl.max(qabs, axis=0))
    tl.store(amax_ptr + BH + pid, tl.max(kabs, axis=0))
    tl.store(amax_ptr + 2 * BH + pid, tl.max(vabs, axis=0))


@triton.jit
def _group_amax(amax_ptr, h, H, B, BH, PER_HEAD: tl.constexpr, BP: tl.constexpr, BHP: tl.constexpr):
    """The amax one scale covers, from the per-(batch, head) amax[BH]: this head's over all
    batches (PER_HEAD) or all heads'; floored at 1e-12 so an all-zero input gets finite scales."""
    if PER_HEAD:
        offs = tl.arange(0, BP)
        a = tl.load(amax_ptr + offs * H + h, mask=offs < B, other=0.0)
    else:
        offs = tl.arange(0, BHP)
        a = tl.load(amax_ptr + offs, mask=offs < BH, other=0.0)
    return tl.maximum(tl.max(a, axis=0), 1e-12)


@triton.jit
def _cast_tile(
    x_ptr, y_ptr, sx_b, sx_h, sx_l, sy_b, sy_h, sy_l, b, h, offs_l, L, offs_d, D,
    sub, mul, scale, SUB: tl.constexpr, MUL: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """y8 = e4m3(clamp(((x − sub) · mul) · scale, ±448)) for one [BLOCK_L, DP] tile, in the same
    order of fp32 operations as the reference; both sides strided (any dense layout)."""
    ok = (offs_l < L)[:, None] & (offs_d < D)[None, :]
    xb = x_ptr + b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h
    x = tl.load(xb + offs_l[:, None] * sx_l + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    if SUB:
        x = x - sub[None, :]
    if MUL:
        x = x * mul[None, :]
    y = _to_fp8(tl.clamp(x * scale, -448.0, 448.0), INTERP)
    yb = y_ptr + b.to(tl.int64) * sy_b + h.to(tl.int64) * sy_h
    tl.store(yb + offs_l[:, None] * sy_l + offs_d[None, :], y, mask=ok)


@triton.jit
def qkv_cast_kernel(
    q_ptr, k_ptr, v_ptr, q8_ptr, k8_ptr, v8_ptr, mean_ptr, qbal_ptr, kbal_ptr, amax_ptr, ds_ptr,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
    s8q_b, s8q_h, s8q_l, s8k_b, s8k_h, s8k_l, s8v_b, s8v_h, s8v_l,
    B, H, LQ, LK, NSP, o_headroom,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_L: tl.constexpr, BP: tl.constexpr, BHP: tl.constexpr,
    PER_HEAD: tl.constexpr, SMOOTH: tl.constexpr, BALANCE: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """Grid (token blocks, B·H): Q, K, V of one block of BLOCK_L tokens of one (batch, head) to
    e4m3. Each program takes its scales from the small amax[3, BH] of qkv_finish_kernel (a load
    and a max from L2, cheaper than a launch to reduce them first), and the first block of each
    scale's group writes its descale into ds: descale_q, descale_k, descale_v at 0, NSP, 2·NSP
    (H or 1 of them each), descale_o at 3·NSP and scale_o at 3·NSP + 4 (NSP, a multiple of 4,
    keeps every one 16-byte aligned); the very first program writes O's two."""
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    BH = B * H
    aq = _group_amax(amax_ptr, h, H, B, BH, PER_HEAD, BP, BHP)
    ak = _group_amax(amax_ptr + BH, h, H, B, BH, PER_HEAD, BP, BHP)
    av = _group_amax(amax_ptr + 2 * BH, h, H, B, BH, PER_HEAD, BP, BHP)
    # (1/amax)·448 as the reference computes it (PyTorch's 448 / tensor is reciprocal, then multiply)
    scale_q = tl.math.div_rn(1.0, aq) * 448.0
    scale_k = tl.math.div_rn(1.0, ak) * 448.0
    scale_v = tl.math.div_rn(1.0, av) * 448.0

    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, DP)
    stats = pid_bh * DP + offs_d
    inv_s = tl.load(qbal_ptr + stats)
    _cast_tile(q_ptr, q8_ptr, sq_b, sq_h, sq_l, s8q_b, s8q_h, s8q_l, b, h, offs_l, LQ, offs_d, D,
               inv_s, inv_s, scale_q, False, BALANCE, INTERP)  # fmt: skip
    mean = tl.load(mean_ptr + stats)
    s = tl.load(kbal_ptr + stats)
    _cast_tile(k_ptr, k8_ptr, sk_b, sk_h, sk_l, s8k_b, s8k_h, s8k_l, b, h, offs_l, LK, offs_d, D,
               mean, s, scale_k, SMOOTH, BALANCE, INTERP)  # fmt: skip
    _cast_tile(v_ptr, v8_ptr, sv_b, sv_h, sv_l, s8v_b, s8v_h, s8v_l, b, h, offs_l, LK, offs_d, D,
               mean, s, scale_v, False, False, INTERP)  # fmt: skip

    # descales: amax / 448, written once per group (masked stores, no branch)
    if PER_HEAD:
        first = (pid_l == 0) & (b == 0)
        slot = h
    else:
        first = (pid_l == 0) & (pid_bh == 0)
        slot = 0
    tl.store(ds_ptr + slot, tl.math.div_rn(aq, 448.0), mask=first)
    tl.store(ds_ptr + NSP + slot, tl.math.div_rn(ak, 448.0), mask=first)
    tl.store(ds_ptr + 2 * NSP + slot, tl.math.div_rn(av, 448.0), mask=first)
    # O's scales from the largest V descale (the graph takes one): |O| <= amax|V| (module docstring
    # of quant/attention/cudnn_fp8.py), with headroom for P rounded to e4m3
    very_first = (pid_l == 0) & (pid_bh == 0)
    offs = tl.arange(0, BHP)
    v_all = tl.load(amax_ptr + 2 * BH + offs, mask=(offs < BH) & very_first, other=0.0)
    descale_o = tl.math.div_rn(tl.maximum(tl.max(v_all, axis=0), 1e-12), 448.0) * o_headroom
    tl.store(ds_ptr + 3 * NSP, descale_o, mask=very_first)
    tl.store(ds_ptr + 3 * NSP + 4, tl.math.div_rn(1.0, descale_o), mask=very_first)


@triton.jit
def dequant_o_kernel(o8_ptr, descale_ptr, out_ptr, N, BLOCK: tl.constexpr, INTERP_BF16: tl.constexpr):
    """out = o8 · descale over the flat memory of a dense o8 (out has o8's strides): one launch,
    the descale read on the device (no host sync)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    o = tl.load(o8_ptr + offs, mask=ok, other=0.0).to(tl.float32) * tl.load(descale_ptr)
    if INTERP_BF16:  # the interpreter's fp32 -> bf16 cast truncates: round to nearest even first
        o = _round_bf16(o)
    tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=ok)
