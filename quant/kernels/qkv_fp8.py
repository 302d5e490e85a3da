"""The cuDNN FP8 attention's pre-pass in Triton: bf16/fp16 Q, K, V ([B,H,L,D], any layout with a
unit stride along D) to FP8 e4m3 in the same layouts, with fp32 descales per tensor or per head,
K smoothed (its mean over tokens subtracted) and optionally Q/K balanced per channel; and O's
dequantization. quant/attention/cudnn_fp8.py holds the scheme, the PyTorch references these
match, and the choice between them (`quantize_qkv`, `dequantize_o`).

Why three launches and not one: every scale depends on an amax over all tokens (and, per tensor,
over all heads), so the inputs are read twice: once for statistics, once to cast. In between,
one small kernel finishes the statistics. Z-Image's whole attention call is ~0.3 ms, so launches
count: the pass makes no PyTorch op besides the allocations.
1. stats: the 8-bit attention's `stats_kernel` with QKV=True, grid (chunks, B·H) so that a
   short sequence still fills the GPU; per chunk and channel: sum, min and max of K, amax|Q|,
   amax|V| (one read of Q, K and V).
2. finish: one program per (batch, head) reduces the chunks into K's mean, the balancing
   factors and the (batch, head)'s largest balanced |Q|, |K − mean|, |V|.
3. cast: grid (token blocks, B·H); each program reduces the few per-(batch, head) amaxes its
   scales cover (L2-resident; cheaper than another launch, and no atomics or grid-wide sync),
   casts its Q, K, V tiles with strided stores, and the first program of each group writes the
   descales, the very first also O's descale and scale (so the attention needs no extra op).
The fp32 operations are the reference's, in the same order, with IEEE-rounded divides and
square roots; only K's mean is summed in another order, which can move a code by one e4m3 step.

Triton is imported lazily (the pack must import without it); callers check `can_run_triton`.
"""

from __future__ import annotations

import torch

from . import interpreting, triton_cdiv

_FP8 = torch.float8_e4m3fn
STATS_PROGRAMS = 1024  # stats programs to aim for on a GPU: several per SM (132 on an H100)
MAX_CHUNKS = 64  # per (batch, head): bounds what the finish kernel's one program per head reads


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def stats_chunking(length: int, bh: int, block: int, *, gpu: bool) -> tuple[int, int]:
    """(tokens per stats program, chunks per (batch, head)): on a GPU ~STATS_PROGRAMS programs in
    all, at most MAX_CHUNKS per (batch, head); under the interpreter one block per chunk (few
    rows per program are cheap there, and the tests then cross chunk boundaries)."""
    nblk = triton_cdiv(length, block)
    want = min(MAX_CHUNKS, max(1, triton_cdiv(STATS_PROGRAMS, bh))) if gpu else nblk
    chunk = block * triton_cdiv(nblk, min(want, nblk))
    return chunk, triton_cdiv(length, chunk)


def quantize_qkv_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    granularity: str = "tensor",
    smooth_k: bool = True,
    balance: bool = False,
    o_headroom: float = 1.0,
) -> tuple[torch.Tensor, ...]:
    """(q8, k8, v8, descale_q, descale_k, descale_v, descale_o, scale_o): the FP8 tensors in the
    inputs' layouts (empty_like), descales [1,1,1,1] (granularity "tensor") or [1,H,1,1] ("head",
    over all batches), descale_o = largest descale_v · o_headroom and scale_o = 1 / descale_o, all
    fp32 on the inputs' device. q [B,H,LQ,D], k/v [B,H,LK,D], stride(-1) == 1, non-empty."""
    if granularity not in ("tensor", "head"):
        raise ValueError(f"granularity {granularity!r}: choose tensor or head")
    from . import _tl_fp8_attention as tla
    from . import _tl_qkv_fp8 as tlq

    B, H, LQ, D = q.shape
    LK = k.shape[2]
    BH, DP, dev = B * H, _pow2(D), q.device
    gpu = dev.type == "cuda"
    per_head = granularity == "head"
    f32 = torch.float32

    # rows per load in the stats pass: five [32, D] fp32 accumulators and three loaded tiles over 8
    # warps stay in registers (5·16 + 3·16 a thread at D = 128)
    block = 32 if gpu else 16
    chunk, nchunk = stats_chunking(max(LQ, LK), BH, block, gpu=gpu)
    npart = BH * nchunk * 5 * DP
    scratch = torch.empty(npart + 3 * BH * DP + 3 * BH, device=dev, dtype=f32)  # one allocation
    part, amax = scratch[:npart], scratch[-3 * BH :]
    stats = scratch[npart : npart + 3 * BH * DP].view(3, BH, DP)  # K's mean, 1/s, s
    ns = H if per_head else 1
    nsp = -(-ns // 4) * 4  # each descale 16-byte aligned in one buffer
    ds = torch.empty(3 * nsp + 8, device=dev, dtype=f32)
    q8, k8, v8 = (torch.empty_like(x, dtype=_FP8) for x in (q, k, v))

    tla.stats_kernel[(nchunk, BH)](
        q, k, v, part, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], H, LQ, LK, nchunk, chunk,
        D=D, DP=DP, BLOCK=block, BALANCE=balance, QKV=True, num_warps=8 if gpu else 4,
    )  # fmt: skip
    tlq.qkv_finish_kernel[(BH,)](
        part, stats[0], stats[1], stats[2], amax, nchunk, LK, BH,
        DP=DP, CB=min(16, _pow2(nchunk)), SMOOTH=smooth_k, BALANCE=balance, num_warps=4,
    )  # fmt: skip
    block_l = max(8, 4096 // DP) if gpu else 16  # 4096 elements a tile: 32 fp32 a thread at 4 warps
    tlq.qkv_cast_kernel[(triton_cdiv(max(LQ, LK), block_l), BH)](
        q, k, v, q8, k8, v8, stats[0], stats[1], stats[2], amax, ds,
        *(st for t in (q, k, v, q8, k8, v8) for st in t.stride()[:3]),
        B, H, LQ, LK, nsp, float(o_headroom),
        D=D, DP=DP, BLOCK_L=block_l, BP=_pow2(B), BHP=_pow2(BH), PER_HEAD=per_head, SMOOTH=smooth_k,
        BALANCE=balance, INTERP=interpreting(), num_warps=4,
    )  # fmt: skip
    shape = (1, ns, 1, 1)
    one = (1, 1, 1, 1)
    descales = (ds[i * nsp : i * nsp + ns].view(shape) for i in range(3))
    return q8, k8, v8, *descales, ds[3 * nsp : 3 * nsp + 1].view(one), ds[3 * nsp + 4 : 3 * nsp + 5].view(one)


def is_dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill its memory span exactly (any order of dimensions): then a kernel
    can walk it flat, and empty_like gives an output with the same strides."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda p: p[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def dequantize_o_triton(o8: torch.Tensor, descale_o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """o8.float() * descale_o in `dtype`, in o8's layout (a [B,H,L,D] view of [B,L,H,D] memory
    stays one): one launch over the flat memory; descale_o is a one-element device tensor, read
    by the kernel. o8 must be dense (`is_dense`)."""
    from . import _tl_qkv_fp8 as tlq

    out = torch.empty_like(o8, dtype=dtype)
    n = o8.numel()
    block = 4096 if o8.device.type == "cuda" else 1024
    interp_bf16 = interpreting() and dtype == torch.bfloat16
    tlq.dequant_o_kernel[(triton_cdiv(n, block),)](
        o8, descale_o, out, n, BLOCK=block, INTERP_BF16=interp_bf16, num_warps=4
    )
    return out
