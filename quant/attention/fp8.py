"""FP8 attention: the public entry `fp8_attention`, its plain-PyTorch twin
`fp8_attention_reference`, the `onlinequant::fp8_attention` custom op, and `comfy_fp8_attention`,
an adapter with ComfyUI's attention-function signature (quant/ never imports ComfyUI: the
adapter only speaks tensors).

Scheme (shared by kernel and reference; why each choice is in quant/kernels/fp8_attention.py):
Q per token and head, K per block of `block_n` tokens (or per token) and head, after
subtracting K's mean over tokens and balancing Q/K channel by channel, in INT8 (default) or FP8
e4m3; V per block, head and channel in FP8 e4m3; fp32 scales; online softmax in fp32 (exp2,
scale folded in); P scaled by 2**8.8 into FP8 for P·V (or P·V in bf16).
"""

from __future__ import annotations

import logging

import torch

from ..errors import AttentionUnsupportedError
from ..kernels import fp8_attention as _k

logger = logging.getLogger(__name__)

LAYOUTS = ("bhld", "blhd")
HEAD_DIMS = (64, 128, 256)
_DTYPES = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- reference
def _fp8_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to e4m3fn (nearest, ties to even, saturating at ±448) and back to fp32,
    as the GPU's cvt.rn.satfinite does. Done on the bits because PyTorch's own cast does not
    round exact ties to even (100.0 -> 104, not 96), and bf16 inputs scaled by 448/amax hit ties."""
    x = x.float().clamp(-_k.FP8_MAX, _k.FP8_MAX)
    bits = x.view(torch.int32)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000  # keep 3 mantissa bits
    normal = bits.view(torch.float32)
    # below 2**-6 e4m3 is subnormal: multiples of 2**-9 (torch.round: ties to even, as cvt.rn)
    return torch.where(x.abs() < 2.0**-6, torch.round(x * 512.0) / 512.0, normal)


def _quantize_rows(x: torch.Tensor, qk_int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) symmetric quantization as the kernel does it: (dequantizable codes as
    fp32, scale per row)."""
    amax = x.abs().amax(-1).clamp_min(1e-20)
    if qk_int8:
        return torch.floor(x * (127.0 / amax)[..., None] + 0.5), amax / 127.0
    return _fp8_round(x * (_k.FP8_MAX / amax)[..., None]), amax / _k.FP8_MAX


def fp8_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_n: int = 128,
    qk_int8: bool = True,
    v_fp8: bool = True,
    smooth_k: bool = True,
    balance: bool | None = None,
    k_per_token: bool = False,
) -> torch.Tensor:
    """What the kernel computes, in plain PyTorch fp32 (slow; for tests and error studies).

    q [B,H,LQ,D], k/v [B,H,LK,D] (any strides); returns [B,H,LQ,D] in q.dtype. Walks the key
    blocks with the same online softmax as the kernel, so P is quantized against the running
    max exactly as there; only the order of fp32 additions inside each block product differs."""
    balance = qk_int8 if balance is None else balance
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    kmean, qbal, kbal = _k.attention_stats(q, k, smooth_k=smooth_k, balance=balance)
    qk_scale = torch.tensor(D**-0.5 * _k.LOG2E, dtype=torch.float32)
    q8, sq = _quantize_rows(q.float() * qbal[:, :, None, :], qk_int8)
    sq = sq * qk_scale
    kf = (k.float() - kmean[:, :, None, :]) * kbal[:, :, None, :]
    if k_per_token:
        k8, ks = _quantize_rows(kf, qk_int8)
    else:  # one scale per block of block_n tokens: quantize each block as one row
        pad = (-LK) % block_n
        kb = torch.nn.functional.pad(kf, (0, 0, 0, pad)).unflatten(2, (-1, block_n)).flatten(3)
        k8, ks = _quantize_rows(kb, qk_int8)  # [B,H,NBLK,block_n*D], [B,H,NBLK]
        k8 = k8.unflatten(3, (block_n, D)).flatten(2, 3)[:, :, :LK]
        ks = ks.repeat_interleave(block_n, dim=2)[:, :, :LK]
    vf = v.float()
    m = torch.full((B, H, LQ), float("-inf"), device=q.device)
    l_sum = torch.zeros((B, H, LQ), device=q.device)
    acc = torch.zeros((B, H, LQ, D), device=q.device)
    for start in range(0, LK, block_n):
        kb = k8[:, :, start : start + block_n]
        n = kb.shape[2]
        s = (q8 @ kb.transpose(-1, -2)) * ks[:, :, None, start : start + n]  # [B,H,LQ,n]
        m_new = torch.maximum(m, s.amax(-1) * sq)
        p = torch.exp2(s * sq[..., None] - (m_new - _k.P_SHIFT)[..., None])
        alpha = torch.exp2(m - m_new)
        l_sum = l_sum * alpha + p.sum(-1)
        vb = vf[:, :, start : start + n]
        if v_fp8:
            vmax = vb.abs().amax(-2).clamp_min(1e-20)  # [B,H,D] per channel in this block
            v8 = _fp8_round(vb * (_k.FP8_MAX / vmax)[..., None, :])
            acc = acc * alpha[..., None] + (_fp8_round(p) @ v8) * (vmax / _k.FP8_MAX)[..., None, :]
        else:
            acc = acc * alpha[..., None] + p.to(v.dtype).float() @ vb
        m = m_new
    return (acc / l_sum[..., None]).to(q.dtype)


# --------------------------------------------------------------------------- checks
def _device_reason(device: torch.device) -> str | None:
    if device.type == "cpu":
        return None if _k.interpreting() else "CPU tensors (the FP8 kernel needs a CUDA GPU)"
    if device.type != "cuda":
        return f"{device.type} tensors (the FP8 kernel runs on CUDA GPUs)"
    if torch.version.hip is not None:
        return "ROCm (the kernel uses NVIDIA's e4m3fn; MI300 needs e4m3fnuz)"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "a GPU older than Ada/Hopper (sm_89+ has FP8 tensor cores)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> str | None:
    """Why the FP8 kernel can't take these [B,H,L,D] views, or None when it can."""
    if mask is not None:
        return "an attention mask"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"{q.dim()}-D inputs (expected [B,H,L,D])"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (bf16 or fp16 only)"
    B, H, LQ, D = q.shape
    if D not in HEAD_DIMS:
        return f"head dim {D} (supported: {HEAD_DIMS})"
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        return f"mismatched shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if LQ == 0 or k.shape[2] == 0 or B * H == 0:
        return "empty inputs"
    if B * H > 65535:
        return f"batch×heads {B * H} > 65535"
    if not (q.device == k.device == v.device):
        return "inputs on different devices"
    return _device_reason(q.device)


# --------------------------------------------------------------------------- custom op
def _op_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out_blhd: bool,
    qk_int8: bool,
    v_fp8: bool,
    smooth_k: bool,
    k_per_token: bool,
) -> torch.Tensor:
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(_out_shape(q, out_blhd), device=q.device, dtype=q.dtype)
    # [B,L,H,D] memory is written through a permuted view: Wan's layout, no copy
    kernel_out = out.permute(0, 2, 1, 3) if out_blhd else out
    _k.fp8_attention_triton(
        q, k, v, kernel_out, qk_int8=qk_int8, v_fp8=v_fp8, smooth_k=smooth_k, k_per_token=k_per_token
    )
    return out


def _out_shape(q: torch.Tensor, out_blhd: bool) -> tuple[int, int, int, int]:
    """The op's output shape, one source for the kernel path and the fake: [B,L,H,D] or [B,H,L,D]."""
    B, H, LQ, D = q.shape
    return (B, LQ, H, D) if out_blhd else (B, H, LQ, D)


def _op_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out_blhd: bool,
    qk_int8: bool,
    v_fp8: bool,
    smooth_k: bool,
    k_per_token: bool,
) -> torch.Tensor:
    return q.new_empty(_out_shape(q, out_blhd))


def _register_op():
    """Register onlinequant::fp8_attention once per process: the package may be imported twice
    (as `quant` and as `comfyui_online_quant.quant`); the second import reuses it."""
    try:
        return torch.ops.onlinequant.fp8_attention.default
    except (AttributeError, RuntimeError):
        pass
    op = torch.library.custom_op("onlinequant::fp8_attention", mutates_args=())(_op_impl)
    op.register_fake(_op_fake)
    return torch.ops.onlinequant.fp8_attention.default


_OP = _register_op()


# --------------------------------------------------------------------------- entry points
def fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: str = "bhld",
    heads: int | None = None,
    out_layout: str | None = None,
    *,
    qk: str = "int8",
    pv: str = "fp8",
    k_scale: str = "block",
    smooth_k: bool = True,
) -> torch.Tensor:
    """Non-causal softmax(q·kᵀ/√D)·v with 8-bit Q·Kᵀ and P·V (SageAttention-2's recipe).

    qk: "int8" (default; ~3.5x less error than e4m3 at the same speed, see docs/benchmarks.md) or
    "fp8" (e4m3). pv: "fp8" (default, the fast one) or "bf16" (about 3x less error, no faster
    than cuDNN bf16). k_scale: one K scale per "block" of keys (default) or per "token"
    (slightly more accurate, ~12% slower).

    layout "bhld": q/k/v are [B,H,L,D] (any strides, last one 1; Z-Image's movedim views pass
    without a copy). layout "blhd": q/k/v are [B,L,H·D] (Wan), `heads` required.
    Returns `out_layout` (default: the input layout): [B,H,L,D] or [B,L,H·D], dtype of q.
    Raises AttentionUnsupportedError (with the reason) for anything the kernel can't take;
    callers fall back to their own attention then."""
    if layout not in LAYOUTS or (out_layout or layout) not in LAYOUTS:
        raise AttentionUnsupportedError(f"fp8_attention: unknown layout {layout!r}/{out_layout!r}")
    out_layout = out_layout or layout
    if layout == "blhd":
        if heads is None or q.dim() != 3 or q.shape[-1] % heads or k.dim() != 3 or v.dim() != 3:
            raise AttentionUnsupportedError(
                f"fp8_attention: layout 'blhd' needs [B,L,H·D] inputs and heads (got {tuple(q.shape)}, "
                f"heads={heads})"
            )
        d = q.shape[-1] // heads
        q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise AttentionUnsupportedError(f"fp8_attention: unsupported input: {reason}")
    if qk not in ("int8", "fp8") or pv not in ("bf16", "fp8") or k_scale not in ("block", "token"):
        raise AttentionUnsupportedError(
            f"fp8_attention: qk={qk!r} pv={pv!r} k_scale={k_scale!r} (int8|fp8, bf16|fp8, block|token)"
        )
    out = _OP(q, k, v, out_layout == "blhd", qk == "int8", pv == "fp8", smooth_k, k_scale == "token")
    return out.flatten(2) if out_layout == "blhd" else out


def comfy_fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    attn_precision=None,
    skip_reshape: bool = False,
    skip_output_reshape: bool = False,
    **kwargs,
) -> torch.Tensor | None:
    """ComfyUI's attention-function signature (comfy.ldm.modules.attention.attention_pytorch).

    Returns the output in the layout ComfyUI's own function would (skip_reshape: inputs
    [B,H,L,D]; skip_output_reshape: output [B,H,L,D], else [B,L,H·D]), or None when the FP8
    kernel can't take the call (mask, dtype, head dim, device...): the caller then runs its own
    function. `unsupported_comfy_reason` says why."""
    if unsupported_comfy_reason(q, k, v, heads, mask, skip_reshape) is not None:
        return None
    layout = "bhld" if skip_reshape else "blhd"
    out_layout = "bhld" if skip_output_reshape else "blhd"
    return fp8_attention(q, k, v, layout=layout, heads=heads, out_layout=out_layout)


def unsupported_comfy_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    skip_reshape: bool = False,
) -> str | None:
    """Why `comfy_fp8_attention` would return None for this call (for a one-time warning)."""
    if mask is not None:
        return "an attention mask"
    if skip_reshape:
        return unsupported_reason(q, k, v)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or q.shape[-1] % heads:
        return f"input shape {tuple(q.shape)} with heads={heads}"
    d = q.shape[-1] // heads
    return unsupported_reason(*(t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v)))


def runtime_unavailable_reason() -> str | None:
    """Why the kernel can't run in this process at all (no CUDA GPU, older than sm_89, ROCm, no
    Triton), or None. For a node's one-time "unavailable" message."""
    if not torch.cuda.is_available():
        return "the FP8 attention kernel needs an NVIDIA GPU (sm_89+: Ada/Hopper) and Triton"
    return _device_reason(torch.device("cuda"))


def fp8_attention_bhld(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pv: str = "fp8", qk: str = "int8"
) -> torch.Tensor:
    """[B,H,L,D] in, [B,H,L,D] out, for backend registries that speak that layout. The output is
    a view of [B,L,H,D] memory, so the caller's `out.transpose(1, 2).reshape(B, L, H·D)` (Wan,
    Z-Image) costs no copy."""
    B, H, LQ, D = q.shape
    out = fp8_attention(q, k, v, layout="bhld", out_layout="blhd", qk=qk, pv=pv)
    return out.unflatten(-1, (H, D)).transpose(1, 2)


def attention_flops(batch: int, heads: int, lq: int, lk: int, head_dim: int) -> float:
    """Matrix FLOPs of one non-causal forward (2 products, 2 FLOPs per multiply-add)."""
    return 4.0 * batch * heads * lq * lk * head_dim


__all__ = [
    "AttentionUnsupportedError",
    "attention_flops",
    "comfy_fp8_attention",
    "fp8_attention",
    "fp8_attention_bhld",
    "fp8_attention_reference",
    "runtime_unavailable_reason",
    "unsupported_comfy_reason",
    "unsupported_reason",
]
