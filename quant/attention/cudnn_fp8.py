"""cuDNN's FP8 flash attention through the `nvidia-cudnn-frontend` Python graph API, behind the
attention node's `cudnn_fp8` backend. Experimental: on an H100 1.24–1.38× cuDNN's bf16 SDPA at
the Wan shapes but 0.87× at Z-Image, with 6% output error on Gaussian inputs and 16–19% with
outlier channels (docs/benchmarks.md), so the node's `auto` does not pick it.

Scheme: a pre-pass turns bf16/fp16 Q, K, V into FP8 e4m3 with fp32 descales (amax / 448), K
first smoothed by subtracting its mean over tokens (softmax is unchanged by adding a constant to
every logit of a row, so this is exact and lowers K's amax when K has a channel bias); cuDNN
computes softmax(Q·Kᵀ/√D)·V with P in FP8 (scale `SCALE_S`) and writes O in FP8 (on Hopper
cuDNN takes FP8 inputs only with an FP8 output); O is dequantized to the input dtype here.
Optionally (`balance`) Q/s and K·s per channel, as the 8-bit Triton attention does. The pre-pass
and O's dequantization run as Triton kernels (quant/kernels/qkv_fp8.py: one read of Q/K/V for
the statistics, one small finish kernel, one cast; no host sync) where Triton runs; their
PyTorch references here are the specification and the fallback.

O = P·V with each row of P summing to 1 is a convex combination of V's rows, so |O| <= amax(V):
scale_o = 1 / (descale_v · O_HEADROOM) maps O into e4m3 without saturating, and its inverse
dequantizes it. The headroom covers P rounded to e4m3 (each entry within 2^-4 relative, so a row
may sum to 1 + 2^-4) and costs less than a tenth of a bit.

`cudnn` is imported lazily (the pack must load without it) through `cudnn_module()`, a seam
that tests replace with a fake module (`set_cudnn_module`). Graphs are built once per
(shapes, strides, dtype, device, descale shapes) and cached with their workspace
(quant/attention/cudnn_graphs.py); Q/K/V keep the caller's layout ([B,H,L,D] or [B,L,H·D] seen
as [B,H,L,D]): cuDNN gets their strides, no copies.

Scales are per tensor ([1,1,1,1], as in cuDNN's own FP8 SDPA samples). The pre-pass can also
make per-head descales ([1,H,1,1]), but cuDNN 9 on an H100 builds no plan for them (measured).
Q/K balancing is measured no help for e4m3 (its error is relative to each value, unlike INT8's).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BackendUnavailableError
from ..kernels import can_run_triton
from ..kernels.fp8_attention import balance_factors
from ..kernels.qkv_fp8 import dequantize_o_triton, is_dense, quantize_qkv_triton
from .cudnn_graphs import (
    FP8_MAX,
    SCALE_S,
    build_graph,
    cached_graph,
    clear_graph_cache,
    graph_cache_size,
    graph_key,
    make_pack,
)

PACKAGE = "nvidia-cudnn-frontend"
O_HEADROOM = 1.0 + 2.0**-4  # see the module docstring
GRANULARITIES = ("tensor", "head")
_DTYPES = (torch.bfloat16, torch.float16)
_FP8 = torch.float8_e4m3fn


# --------------------------------------------------------------------------- the cudnn seam
def _import_cudnn() -> Any:
    import cudnn  # the nvidia-cudnn-frontend wheel

    return cudnn


_loader: Callable[[], Any] = _import_cudnn


def set_cudnn_module(module: Any | None) -> None:
    """Use `module` in place of `cudnn` (tests pass a fake); None restores the real import.
    Clears the graph cache, since cached graphs belong to the module that built them."""
    global _loader
    _loader = _import_cudnn if module is None else (lambda: module)
    clear_graph_cache()


def missing_package_message() -> str:
    return f"cudnn_fp8 needs the '{PACKAGE}' package (pip install {PACKAGE}); it uses PyTorch's cuDNN"


def cudnn_module() -> Any:
    """The cudnn module, or BackendUnavailableError naming the package to install."""
    try:
        return _loader()
    except Exception as e:  # ImportError, or a broken wheel raising OSError/RuntimeError
        raise BackendUnavailableError(f"{missing_package_message()} ({type(e).__name__}: {e})") from e


def runtime_unavailable_reason() -> str | None:
    """Why cudnn_fp8 can't run in this process (no NVIDIA GPU, older than sm_90, package
    missing), or None. Ada (sm_89) has FP8 tensor cores but cuDNN's FP8 SDPA is untested there."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return "cudnn_fp8 needs an NVIDIA GPU (Hopper sm_90 or Blackwell) with PyTorch's CUDA build"
    cap = torch.cuda.get_device_capability()
    if cap < (9, 0):
        return f"cudnn_fp8 needs sm_90+ (Hopper/Blackwell); this GPU is sm_{cap[0]}{cap[1]} (Ada is untested)"
    try:
        cudnn_module()
    except BackendUnavailableError as e:
        return str(e)
    return None


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> str | None:
    """Why one [B,H,L,D] call can't go to cuDNN FP8 attention (the caller falls back), or None."""
    if mask is not None:
        return "an attention mask (cudnn_fp8 is used unmasked only)"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"{q.dtype} inputs (cudnn_fp8 takes bf16/fp16)"
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1]:
        return f"shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} (needs [B,H,L,D], same heads)"
    d = q.shape[-1]
    if d != k.shape[-1] or d % 16 or d > 256:
        return f"head dim {d} (cuDNN FP8 attention takes multiples of 16 up to 256)"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "a head dim that is not contiguous"
    return None


# --------------------------------------------------------------------------- the pre-pass
@dataclass
class FP8QKV:
    """FP8 e4m3 Q, K (smoothed), V in the inputs' layouts, and their fp32 descales
    ([1,1,1,1] per tensor or [1,H,1,1] per head): x ≈ x8.float() * descale. With balancing, x is
    Q/s and K·s (s per batch, head and channel), whose product Q·Kᵀ is the original one.
    descale_o and scale_o ([1,1,1,1]) are O's FP8 scales (module docstring), made by the pre-pass
    so that the attention call needs no further ops (optional only so that the record can still
    be built from the six tensors above)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    descale_q: torch.Tensor
    descale_k: torch.Tensor
    descale_v: torch.Tensor
    descale_o: torch.Tensor | None = None
    scale_o: torch.Tensor | None = None


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")


def _to_fp8_like(x: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # empty_like keeps a dense permuted layout ([B,L,H,D] memory seen as [B,H,L,D]) as it is
    out = torch.empty_like(like, dtype=_FP8)
    out.copy_((x * scale).clamp(-FP8_MAX, FP8_MAX))  # PyTorch's cast rounds to nearest, ties to even
    return out


def quantize_qkv_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    granularity: str = "tensor",
    smooth_k: bool = True,
    balance: bool = False,
) -> FP8QKV:
    """The pre-pass in plain PyTorch (fp32 maths): q/k/v [B,H,L,D] bf16/fp16, any dense layout.
    Each scale maps its amax to 448; K's mean over tokens (per batch, head, channel) is
    subtracted first when `smooth_k`. `balance`: per (batch, head, channel) Q is multiplied by
    1/s and K (smoothed) by s = sqrt(amax|Q| / amax|K|) (1 where either is 0, clamped to
    [1e-4, 1e4]; the 8-bit Triton attention's balancing), which leaves Q·Kᵀ unchanged and keeps a
    channel that is large in only one of Q, K from setting both their scales."""
    _check_granularity(granularity)
    dims = (0, 1, 2, 3) if granularity == "tensor" else (0, 2, 3)
    qf, kf, vf = q.float(), k.float(), v.float()
    if smooth_k:
        kf = kf - kf.mean(dim=2, keepdim=True)
    if balance:
        inv_s, s = balance_factors(qf.abs().amax(dim=2, keepdim=True), kf.abs().amax(dim=2, keepdim=True))
        qf, kf = qf * inv_s, kf * s
    out = []
    for xf, x in ((qf, q), (kf, k), (vf, v)):
        amax = xf.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12)  # all-zero input: finite scale
        # the scale is (1/amax)·448, spelled out: what `FP8_MAX / amax` computes in PyTorch
        out.append((_to_fp8_like(xf, amax.reciprocal() * FP8_MAX, x), (amax / FP8_MAX).contiguous()))
    (q8, dq), (k8, dk), (v8, dv) = out
    # per-head descales: the largest one (the graph takes one scale_o)
    descale_o = dv.amax().reshape(1, 1, 1, 1) * O_HEADROOM
    return FP8QKV(q8, k8, v8, dq, dk, dv, descale_o, 1.0 / descale_o)


def fp8_triton_device(device: torch.device) -> bool:
    """Whether Triton's e4m3fn (float8e4nv) works on `device`: an NVIDIA GPU of sm_89 or newer
    (cuDNN's FP8 attention itself needs sm_90; ROCm has e4m3fnuz instead), or the CPU, where
    can_run_triton allows only the interpreter."""
    if device.type != "cuda":
        return True
    return torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 9)


def _triton_ok(*ts: torch.Tensor) -> bool:
    """Whether the Triton kernels take these tensors: Triton runs on their device (a GPU with
    e4m3fn, or the CPU under TRITON_INTERPRET=1; see quant/kernels), none is empty, and the head
    dim is unit-stride."""
    dev = ts[0].device
    if not can_run_triton(dev) or not all(t.numel() and t.stride(-1) == 1 for t in ts):
        return False
    return fp8_triton_device(dev)


def quantize_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    granularity: str = "tensor",
    smooth_k: bool = True,
    balance: bool = False,
) -> FP8QKV:
    """The pre-pass the backend runs: the fused Triton pass (quant/kernels/qkv_fp8.py: three
    launches, no host sync) where Triton can run, else the reference. Same results, up to the
    order of the fp32 sum for K's mean (a code may then move by one e4m3 step)."""
    _check_granularity(granularity)
    if not _triton_ok(q, k, v):
        return quantize_qkv_reference(q, k, v, granularity=granularity, smooth_k=smooth_k, balance=balance)
    return FP8QKV(
        *quantize_qkv_triton(
            q, k, v, granularity=granularity, smooth_k=smooth_k, balance=balance, o_headroom=O_HEADROOM
        )
    )


def dequantize_o_reference(o8: torch.Tensor, descale_o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """O in `dtype` from cuDNN's FP8 output: o8.float() * descale_o (a one-element tensor), in
    o8's layout."""
    return (o8.float() * descale_o).to(dtype)


def dequantize_o(o8: torch.Tensor, descale_o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_o_reference` in one Triton launch where it can run (o8 dense, as cuDNN's
    output here always is), else the reference."""
    if _triton_ok(o8) and is_dense(o8):
        return dequantize_o_triton(o8, descale_o, dtype)
    return dequantize_o_reference(o8, descale_o, dtype)


def cudnn_fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    granularity: str = "tensor",
    smooth_k: bool = True,
    balance: bool = False,
) -> torch.Tensor:
    """softmax(q kᵀ/√D) v through cuDNN's FP8 SDPA. q/k/v [B,H,L,D] bf16/fp16 (any dense layout,
    e.g. [B,L,H,D] memory); returns [B,H,L,D] in q.dtype, a view of [B,L,H,D] memory so the
    caller's transpose back to [B,L,H·D] costs no copy. `balance`: see quantize_qkv_reference."""
    cudnn = cudnn_module()
    B, H, LQ, D = q.shape
    x = quantize_qkv(q, k, v, granularity=granularity, smooth_k=smooth_k, balance=balance)
    o8 = torch.empty((B, LQ, H, D), dtype=_FP8, device=q.device).transpose(1, 2)
    g, handle = cached_graph(cudnn, x, o8, 1.0 / math.sqrt(D))
    amax = torch.empty((2, 1, 1, 1, 1), dtype=torch.float32, device=q.device)
    g.graph.execute(make_pack(g, x, o8, amax), g.workspace, handle=handle)
    return dequantize_o(o8, x.descale_o, q.dtype)


__all__ = [
    "FP8QKV",
    "SCALE_S",
    "PACKAGE",
    "build_graph",
    "clear_graph_cache",
    "cudnn_fp8_attention",
    "cudnn_module",
    "dequantize_o",
    "dequantize_o_reference",
    "fp8_triton_device",
    "graph_cache_size",
    "graph_key",
    "missing_package_message",
    "quantize_qkv",
    "quantize_qkv_reference",
    "runtime_unavailable_reason",
    "set_cudnn_module",
    "unsupported_reason",
]
