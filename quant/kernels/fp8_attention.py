"""Triton FP8 attention for Hopper/Ada (issue 8): a K/V quantization pre-pass, then a
FlashAttention-style forward with FP8 Q·Kᵀ and FP8 (or bf16) P·V.

What is quantized, and why (quant/attention.py holds the plain-PyTorch twin, `fp8_attention_reference`):
- Q: per token and head, inside the attention kernel (each program loads its Q block once, so a
  separate pass would only add traffic). A per-token scale costs nothing: it folds into the one
  multiply that already applies softmax's scale and log2(e).
- K: per block of BLOCK_N tokens and head, after subtracting K's mean over tokens (SageAttention's
  smoothing: softmax is invariant to adding q·μ to a whole row, and it removes the channel bias that
  would otherwise set the block's scale).
- V: per block of BLOCK_N tokens, head and channel, stored transposed ([D, L]) because FP8 wgmma
  wants both operands K-major. The block's scale multiplies that block's P·V product, which is
  accumulated in a fresh fp32 tile (Hopper's FP8 MMA accumulates with ~22 bits, so a long running
  sum inside the MMA would lose precision).
- P: exp2 of (logit − running max + 8.8), i.e. scaled into e4m3's range (2^8.8 ≈ 446 < 448); the
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


def default_config(head_dim: int, device: torch.device) -> AttnConfig:
    """Launch parameters per head dim, chosen on an H100 (see .dev/notes/E.md for the sweep)."""
    if device.type != "cuda":  # interpreter: small blocks keep CPU tests fast
        return AttnConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return AttnConfig(block_m=128, block_n=128, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return AttnConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
    return AttnConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels():
    """The Triton kernels, imported on first use (Triton is optional for the pack)."""
    from . import _tl_fp8_attention as tlk

    return tlk.quant_kv_kernel, tlk.attn_fwd_kernel


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
    kamax = torch.maximum(kmax.float() - mean, mean - kmin.float())
    qmin, qmax = torch.aminmax(q, dim=2)
    qamax = torch.maximum(qmax.float(), -qmin.float())
    ok = (kamax > 0) & (qamax > 0)
    s = torch.where(ok, torch.sqrt(qamax / kamax.clamp_min(1e-30)), torch.ones_like(qamax))
    s = s.clamp(1e-4, 1e4)
    return mean.contiguous(), (1.0 / s).contiguous(), s.contiguous()


def fp8_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    *,
    qk_int8: bool = True,
    v_fp8: bool = False,
    smooth_k: bool = True,
    balance: bool | None = None,
    k_per_token: bool = True,
    config: AttnConfig | None = None,
) -> torch.Tensor:
    """Run the pre-pass and the forward. q [B,H,LQ,D], k/v [B,H,LK,D], out [B,H,LQ,D]: any
    strides with the last one 1 (so [B,L,H,D] memory passes as a permuted view, no copy).
    Writes `out` and returns it. Callers validate shapes/dtypes/devices first.
    `balance` defaults to `qk_int8` (it helps INT8 and is neutral for FP8's relative precision)."""
    quant_kv_kernel, attn_fwd_kernel = _kernels()
    cfg = config or default_config(q.shape[-1], q.device)
    balance = qk_int8 if balance is None else balance
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    bn = cfg.block_n
    nblk = -(-LK // bn)
    lpad = nblk * bn
    dev = q.device
    exact = interpreting()

    kmean, qbal, kbal = attention_stats(q, k, smooth_k=smooth_k, balance=balance)
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
