"""Triton 8-bit attention for Hopper/Ada: a stats pass and a K/V quantization
pass, then a FlashAttention-style forward with 8-bit Q·Kᵀ and FP8 (or bf16) P·V.

What is quantized, and why (quant/attention.py holds the plain-PyTorch twin, `fp8_attention_reference`):
- Q·Kᵀ in INT8 by default, FP8 e4m3 as an option. Measured on random and outlier inputs, e4m3's
  3-bit mantissa gives ~3.5x the output error of INT8 with the same scales (INT8 wgmma runs at
  the FP8 rate on Hopper). The int32 products become fp32 through the 1.5·2²³ bit trick.
- Channel balancing: Q/s and K·s per channel with s = sqrt(amax|Q|/amax|K|) leaves Q·Kᵀ unchanged
  and stops a channel that is large in only one of Q, K from wasting the other's INT8 range
  (outlier error 30% -> 3%). K's mean over tokens is subtracted first (SageAttention's
  smoothing; softmax is invariant to adding q·μ to a whole row).
- Q: per token and head, inside the forward (each program loads its Q block once). A per-token
  scale costs nothing: it joins the multiply that applies softmax's scale and log2(e).
- K: per block of BLOCK_N tokens (default; the scale joins Q's row scale, one FMA per logit) or
  per token (a little more accurate, one more multiply per logit).
- V: per block of BLOCK_N tokens, head and channel, in FP8 e4m3, stored transposed ([D, L]) because
  FP8 wgmma wants both operands K-major. Each block's P·V lands in a fresh fp32 tile before it is
  scaled and added (Hopper's FP8 MMA accumulates with reduced precision; SageAttention-2's fix).
- P: exp2(logit − running max + 8.8), i.e. scaled into e4m3's range (2^8.8 ≈ 446 < 448); the
  same factor sits in the row sum, so it cancels in the final division.

Triton is imported lazily (the pack must import without it); every launcher here takes tensors
already validated by quant/attention.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

FP8_MAX = 448.0  # e4m3fn
P_SHIFT = 8.8  # log2 of P's largest value after scaling; 2**8.8 ≈ 445.7 stays under FP8_MAX
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttnConfig:
    """Block sizes and launch parameters of the forward kernel (the pre-pass uses BLOCK_N)."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    warp_specialize: bool = False  # tl.range(warp_specialize=...) on the key loop


def default_config(
    head_dim: int,
    device: torch.device,
    *,
    qk_int8: bool = True,
    v_fp8: bool = True,
    k_per_token: bool = False,
) -> AttnConfig:
    """Launch parameters per mode and head dim, from the H100 sweep in docs/benchmarks.md
    (`python -m quant.bench.attention --tune`); D=64/256 are untuned guesses."""
    if device.type != "cuda":  # interpreter: small blocks keep CPU tests fast
        return AttnConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
    if head_dim > 128:  # registers: a 128x256 fp32 accumulator needs smaller row blocks
        return AttnConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    if head_dim < 128:
        return AttnConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if v_fp8:
        if qk_int8 and not k_per_token:
            return AttnConfig(128, 128, 8, 3)  # 14.53 ms at Wan 5B (64x128 w4: 14.78)
        return AttnConfig(64, 128, 4, 3)  # FP8 Q·K: 13.66 ms (128x128 w8: 15.88)
    if k_per_token:
        return AttnConfig(128, 64, 8, 3)
    return AttnConfig(128, 128, 8, 3)  # 15.75 ms (128x64 w8: 16.13)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels():
    """The Triton kernels, imported on first use (Triton is optional for the pack)."""
    from . import _tl_fp8_attention as tlk

    return tlk.quant_kv_kernel, tlk.attn_fwd_kernel


def balance_factors(qamax: torch.Tensor, kamax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/s, s) per channel from amax|Q| and amax|K − mean|: s = sqrt(qamax / kamax), 1 where
    either is 0, clamped to [1e-4, 1e4]. The same fp32 operations as the kernels' `balance_factor`
    (also used by the cuDNN FP8 pre-pass, quant/attention/cudnn_fp8.py)."""
    ok = (kamax > 0) & (qamax > 0)
    s = torch.where(ok, torch.sqrt(qamax / kamax.clamp_min(1e-30)), torch.ones_like(qamax))
    s = s.clamp(1e-4, 1e4)
    return 1.0 / s, s


def _finish_stats(
    mean: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, qamax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inv_s, s = balance_factors(qamax, torch.maximum(kmax - mean, mean - kmin))
    return mean.contiguous(), inv_s.contiguous(), s.contiguous()


def attention_stats_triton(
    q: torch.Tensor, k: torch.Tensor, *, smooth_k: bool, balance: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`attention_stats` with one fused pass over Q and K (Triton), same results up to the
    order of the fp32 sum."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    if not smooth_k and not balance:
        return attention_stats(q, k, smooth_k=False, balance=False)
    from . import _tl_fp8_attention as tlk

    block = 32  # rows per load: two [32, D] fp32 tiles (K and Q) stay in registers
    L = max(LQ, LK) if balance else LK
    chunk = block * max(1, -(-L // (block * 64)))  # ~64 chunks per head: enough programs
    nchunk = -(-L // chunk)
    part = torch.empty(B * H, nchunk, 4, D, device=q.device, dtype=torch.float32)
    tlk.stats_kernel[(nchunk, B * H)](
        q, k, k, part, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        k.stride(0), k.stride(1), k.stride(2), H, LQ, LK, nchunk, chunk,
        D=D, DP=D, BLOCK=block, BALANCE=balance, QKV=False, num_warps=8 if q.is_cuda else 4,
    )  # fmt: skip
    mean, qbal, kbal = (torch.empty(B, H, D, device=q.device, dtype=torch.float32) for _ in range(3))
    tlk.stats_finish_kernel[(B * H,)](
        part, mean, qbal, kbal, nchunk, LK, D=D, SMOOTH=smooth_k, BALANCE=balance, num_warps=1
    )
    return mean, qbal, kbal


def attention_stats(
    q: torch.Tensor, k: torch.Tensor, *, smooth_k: bool, balance: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (batch, head, channel) statistics the quantizers use, each [B,H,D] fp32 contiguous:
    K's mean over tokens (subtracted from K: softmax is invariant to it) and the balancing factor
    s = sqrt(amax|Q| / amax|K − mean|) that moves outliers between Q and K channel by channel
    (Q·Kᵀ is unchanged by Q/s, K·s; INT8's error follows amax, so this keeps a channel that is
    large in only one of Q, K from costing both their precision). Returns (mean, 1/s, s)."""
    B, H, _, D = q.shape
    if smooth_k:
        mean = torch.mean(k, dim=2, dtype=torch.float32)
    else:
        mean = torch.zeros(B, H, D, device=q.device, dtype=torch.float32)
    if not balance:
        one = torch.ones(B, H, D, device=q.device, dtype=torch.float32)
        return mean.contiguous(), one, one
    kmin, kmax = torch.aminmax(k, dim=2)
    qmin, qmax = torch.aminmax(q, dim=2)
    qamax = torch.maximum(qmax.float(), -qmin.float())
    return _finish_stats(mean, kmin.float(), kmax.float(), qamax)


def fp8_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    *,
    qk_int8: bool = True,
    v_fp8: bool = True,
    smooth_k: bool = True,
    balance: bool | None = None,
    k_per_token: bool = False,
    config: AttnConfig | None = None,
    stats: str = "triton",
) -> torch.Tensor:
    """Run the pre-pass and the forward. q [B,H,LQ,D], k/v [B,H,LK,D], out [B,H,LQ,D]: any
    strides with the last one 1 (so [B,L,H,D] memory passes as a permuted view, no copy).
    Writes `out` and returns it. Callers validate shapes/dtypes/devices first.
    `balance` defaults to `qk_int8` (it helps INT8 and is neutral for FP8's relative precision).
    `stats`: "triton" (fused pass) or "torch" (PyTorch reductions; kept for the benchmark)."""
    quant_kv_kernel, attn_fwd_kernel = _kernels()
    cfg = config or default_config(
        q.shape[-1], q.device, qk_int8=qk_int8, v_fp8=v_fp8, k_per_token=k_per_token
    )
    balance = qk_int8 if balance is None else balance
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    bn = cfg.block_n
    nblk = -(-LK // bn)
    lpad = nblk * bn
    dev = q.device
    exact = interpreting()

    stats_fn = attention_stats_triton if stats == "triton" else attention_stats
    kmean, qbal, kbal = stats_fn(q, k, smooth_k=smooth_k, balance=balance)
    k8 = torch.empty(B * H, lpad, D, device=dev, dtype=torch.int8 if qk_int8 else torch.float8_e4m3fn)
    ks = torch.empty(B * H, lpad if k_per_token else nblk, device=dev, dtype=torch.float32)
    if v_fp8:
        v8 = torch.empty(B * H, D, lpad, device=dev, dtype=torch.float8_e4m3fn)
        vs = torch.empty(B * H, nblk, D, device=dev, dtype=torch.float32)
    else:
        v8, vs = v, ks  # unused by the pre-pass; the forward reads v directly
    quant_kv_kernel[(nblk, B * H)](
        k, v, kmean, kbal, k8, ks, v8, vs,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        H, LK, lpad, nblk,
        D=D, BLOCK_N=bn, QK_INT8=qk_int8, V_FP8=v_fp8, K_TOKEN=k_per_token, INTERP=exact,
        num_warps=4,
    )  # fmt: skip
    attn_fwd_kernel[(-(-LQ // cfg.block_m), B * H)](
        q, qbal, k8, ks, v8, vs, out,
        q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, LQ, LK, lpad, nblk, float(D**-0.5 * LOG2E),
        D=D, BLOCK_M=cfg.block_m, BLOCK_N=bn, QK_INT8=qk_int8, V_FP8=v_fp8, K_TOKEN=k_per_token,
        WARP_SPEC=cfg.warp_specialize, INTERP=exact, OUT_BF16=out.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
