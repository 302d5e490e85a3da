"""Triton: FP8 -> bf16/fp16 with the weight's scale in one memory-bound pass, for the weights-only
(W8A16) GEMM path: the packed weight stays FP8 at rest, one layer's 16-bit copy exists only while
that layer runs, and cuBLAS does the GEMM."""

import triton
import triton.language as tl

from ._tl_common import round_to_bf16


@triton.jit
def fp8_dequant_kernel(
    q_ptr,
    s_ptr,
    out_ptr,
    N,
    K,
    stride_qn,
    stride_on,
    PER_ROW: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rn < N)[:, None] & (rk < K)[None, :]
    rn64 = rn.to(tl.int64)
    q = tl.load(q_ptr + rn64[:, None] * stride_qn + rk[None, :], mask=ok, other=0.0).to(tl.float32)
    if PER_ROW:  # noqa: SIM108  (a constexpr branch: Triton compiles one side)
        s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)[:, None]
    else:
        s = tl.load(s_ptr)
    w = q * s  # fp32 product, one rounding to the output dtype: exactly quant.formats.fp8.dequantize
    if EMULATE_BF16:
        w = round_to_bf16(w)  # the interpreter's bf16 cast truncates; GPUs round to nearest even
    tl.store(out_ptr + rn64[:, None] * stride_on + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)
