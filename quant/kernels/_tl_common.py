"""Triton helpers shared by the kernels (imported only when a kernel runs)."""

import triton
import triton.language as tl


@triton.jit
def round_to_e4m3(v, FNUZ: tl.constexpr):
    """Round fp32 values in [-fmax, fmax] to the nearest e4m3fn (or, FNUZ, e4m3fnuz) value,
    ties to even, in fp32.

    Used only under the CPU interpreter: Triton 3.8's interpreter casts fp32 -> fp8 without the
    mantissa carry (1.94 became 1.0), while the GPU's cvt instruction rounds correctly. A value
    rounded here casts exactly, so the interpreter then matches the hardware bit for bit.
    """
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    if FNUZ:
        # e4m3fnuz (bias 8): subnormals are multiples of 2**-10, normals start at 2**-7.
        sub = (v + 12288.0) - 12288.0
        sub = tl.where(sub == 0.0, v * 0.0, sub)  # keep the sign of values that round to zero
        return tl.where(tl.abs(v) < 0.0078125, sub, normal)
    else:
        # e4m3fn: subnormals are multiples of 2**-9 (adding 1.5 * 2**14 puts the ulp there, RNE).
        sub = (v + 24576.0) - 24576.0
        sub = tl.where(sub == 0.0, v * 0.0, sub)  # keep the sign of values that round to zero
        return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit
def decode_e2m1(codes):
    """4-bit E2M1 codes (low nibble of int32) -> fp32 values ±{0, .5, 1, 1.5, 2, 3, 4, 6}.

    Built as bits, no table: magnitude m = (e, mant); for e > 0 the value is
    2**(e-1) * (1 + mant/2), which is fp32 exponent e + 126 and mantissa bit 22 = mant;
    m == 1 is the subnormal 0.5 and m == 0 is zero. OCP MX v1.0 section 5.3.3.
    """
    mag = codes & 7
    bits = (mag << 22) + (126 << 23)
    bits = tl.where(mag == 1, 126 << 23, bits)
    bits = tl.where(mag == 0, 0, bits)
    bits = bits | ((codes & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e8m0_to_f32(s):
    """E8M0 scale bytes (int32) -> fp32 powers of two 2**(s-127); 0 is 2**-127 (fp32 subnormal)."""
    bits = tl.where(s == 0, 0x00400000, s << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program, grouped: GROUP_M row tiles share each weight
    column tile while it is in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n


@triton.jit
def round_to_bf16(v):
    """Round fp32 values to the nearest bf16 value, ties to even, in fp32 (finite values only).

    Used only under the CPU interpreter, whose fp32 -> bf16 cast truncates where GPUs round: a
    value rounded here casts exactly, so both give PyTorch's result."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def tile_rows_cols(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """A GEMM program's output rows and columns (grouped order, `tile_ids`) and their in-bounds
    masks: (rm, rn, m_ok, n_ok)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, rm < M, rn < N


@triton.jit
def store_tile(
    acc, bias_ptr, c_ptr, rm, rn, m_ok, n_ok, stride_cm,
    HAS_BIAS: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """The GEMMs' shared epilogue: the fp32 tile plus the bias, cast to the output dtype and
    stored. ROUND_BF16 rounds in fp32 first, for the interpreter (see `round_to_bf16`)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ROUND_BF16:
        acc = round_to_bf16(acc)
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
