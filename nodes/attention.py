"""Per-model attention backend: the "Attention Backend (Online Quant)" node and its registry.

ComfyUI wraps every attention function with `wrap_attn`: when the model's
`transformer_options["optimized_attention_override"]` is set it calls
`override(func, *args, **kwargs)` instead. The node sets that on a clone of the
MODEL, so the input model is unchanged and each model can use its own backend.

Layouts: Z-Image calls with q/k/v [B,H,L,D] and `skip_reshape=True`; Wan with [B,L,H·D]
and `heads`. Backends in the registry take and return [B,H,L,D]. A call a backend cannot take
(mask, fp32 where it needs fp16/bf16, head dim too large, ...) runs ComfyUI's own function with
the arguments untouched, and the first such call per model logs one warning with the reason.

Adding a backend (e.g. FP8 attention) is one `AttentionBackend(...)` entry in
`_builtin_backends()` or a `register_attention_backend(...)` call: `available()` returns None or
the error text naming the package to install; `unsupported(q, k, v, mask)` returns None or why a
call must fall back; `run(q, k, v)` computes softmax(q kᵀ/√D) v. Imports of optional packages
stay inside those functions (the pack must load without them).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..quant.errors import BackendUnavailableError

log = logging.getLogger(__name__)

Tensor = torch.Tensor


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    description: str
    available: Callable[[], str | None]  # None, or the error text (names the package)
    unsupported: Callable[[Tensor, Tensor, Tensor, Tensor | None], str | None]  # q,k,v [B,H,L,D], mask
    run: Callable[[Tensor, Tensor, Tensor], Tensor]  # [B,H,L,D] x3 -> [B,H,L,D]
    handles_mask: bool = False  # run(q, k, v, mask) accepts ComfyUI's mask


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {}
AUTO = "auto"
COMFY_DEFAULT = "comfy_default"


def register_attention_backend(backend: AttentionBackend) -> None:
    """Add (or replace) a backend choice by name."""
    ATTENTION_BACKENDS[backend.name] = backend


# ---- the built-in backends ---------------------------------------------------------------
def _import(module: str):
    try:
        return importlib.import_module(module)
    except Exception:  # ImportError, or a broken binary wheel raising OSError/RuntimeError
        return None


def _flash_unsupported(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> str | None:
    if mask is not None:
        return "an attention mask (flash-attn takes none)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype} inputs (flash-attn takes fp16/bf16)"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} (flash-attn takes <= 256)"
    if q.device.type != "cuda":
        return f"tensors on {q.device.type} (flash-attn needs a GPU)"
    return None


def _fa2_available() -> str | None:
    if _import("flash_attn") is None:
        return "flash_attn_2 needs the 'flash-attn' package (pip install flash-attn; ROCm: AMD's build)"
    return None


def _fa2_run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    fa = importlib.import_module("flash_attn")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn takes [B, L, H, D]
    out = fa.flash_attn_func(q, k, v, dropout_p=0.0, causal=False)
    return out.transpose(1, 2)


def _fa3_available() -> str | None:
    if _import("flash_attn_interface") is None:
        return "flash_attn_3 needs FlashAttention 3 ('flash_attn_interface', from flash-attention's hopper/)"
    return None


def _fa3_run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    fa3 = importlib.import_module("flash_attn_interface")
    out = fa3.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
    if isinstance(out, tuple):  # some FA3 versions return (out, softmax_lse)
        out = out[0]
    return out.transpose(1, 2)


def _sdpa_unsupported(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> str | None:
    return None


def _sdpa_run(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    if mask is not None:
        # ComfyUI's convention (attention_pytorch): add batch / heads dims when missing
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)


def _cudnn_available() -> str | None:
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return "sdpa_cudnn needs an NVIDIA GPU with PyTorch's CUDA build (cuDNN attention)"
    return None


def _cudnn_unsupported(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> str | None:
    if mask is not None:
        return "an attention mask (cuDNN SDPA is used unmasked only)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype} inputs (cuDNN attention takes fp16/bf16)"
    if q.device.type != "cuda":
        return f"tensors on {q.device.type}"
    return None


def _cudnn_run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


def _fp8_available() -> str | None:
    from ..quant.attention.fp8 import runtime_unavailable_reason

    return runtime_unavailable_reason()


def _fp8_unsupported(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> str | None:
    from ..quant.attention.fp8 import unsupported_reason

    return unsupported_reason(q, k, v, mask)


def _fp8_run(q: Tensor, k: Tensor, v: Tensor, pv: str = "fp8") -> Tensor:
    from ..quant.attention.fp8 import fp8_attention_bhld

    return fp8_attention_bhld(q, k, v, pv=pv)


def _cudnn_fp8_available() -> str | None:
    from ..quant.attention.cudnn_fp8 import runtime_unavailable_reason

    return runtime_unavailable_reason()


def _cudnn_fp8_unsupported(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> str | None:
    from ..quant.attention.cudnn_fp8 import unsupported_reason

    if q.device.type != "cuda":
        return f"tensors on {q.device.type} (cudnn_fp8 needs an NVIDIA GPU)"
    return unsupported_reason(q, k, v, mask)


def _cudnn_fp8_run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from ..quant.attention.cudnn_fp8 import cudnn_fp8_attention

    return cudnn_fp8_attention(q, k, v)


def _builtin_backends() -> list[AttentionBackend]:
    return [
        AttentionBackend(  # quant/attention.py; measured in docs/benchmarks.md
            "fp8", "8-bit attention, Triton (INT8 Q·Kᵀ, FP8 P·V; NVIDIA sm_89+): experimental, "
            "0.64-1.05x cuDNN on an H100, ~4% output error",
            _fp8_available, _fp8_unsupported, _fp8_run,
        ),
        AttentionBackend(
            "fp8_bf16pv", "8-bit Q·Kᵀ with bf16 P·V, Triton (NVIDIA sm_89+): ~1% error, no faster than cuDNN",
            _fp8_available, _fp8_unsupported, lambda q, k, v: _fp8_run(q, k, v, pv="bf16"),
        ),
        AttentionBackend(
            "flash_attn_2", "FlashAttention 2 (flash_attn_func); the fast choice on AMD ROCm",
            _fa2_available, _flash_unsupported, _fa2_run,
        ),
        AttentionBackend(
            "flash_attn_3", "FlashAttention 3 (flash_attn_interface), Hopper",
            _fa3_available, _flash_unsupported, _fa3_run,
        ),
        AttentionBackend(  # quant/attention/cudnn_fp8.py; measured in docs/benchmarks.md
            "cudnn_fp8", "cuDNN FP8 flash attention (needs nvidia-cudnn-frontend; NVIDIA Hopper/Blackwell, "
            "Ada untested): experimental; per-tensor E4M3 Q/K/V, K smoothed; 1.24-1.38x cuDNN bf16 at Wan "
            "sizes, 0.87x at Z-Image on an H100, ~6% error (16-19% with outlier channels)",
            _cudnn_fp8_available, _cudnn_fp8_unsupported, _cudnn_fp8_run,
        ),
        AttentionBackend(
            "sdpa", "PyTorch scaled_dot_product_attention (PyTorch picks the kernel)",
            lambda: None, _sdpa_unsupported, _sdpa_run, handles_mask=True,
        ),
        AttentionBackend(
            "sdpa_cudnn", "PyTorch SDPA forced to cuDNN attention (NVIDIA)",
            _cudnn_available, _cudnn_unsupported, _cudnn_run,
        ),
    ]  # fmt: skip


for _b in _builtin_backends():
    register_attention_backend(_b)


def backend_choices() -> list[str]:
    """The node's choices: auto, the registered backends, comfy_default (no override)."""
    return [AUTO, *ATTENTION_BACKENDS, COMFY_DEFAULT]


def resolve_auto() -> tuple[str, str]:
    """(backend, reason) for `auto`: FA2 on ROCm when flash_attn imports; cuDNN SDPA on NVIDIA
    Hopper and newer (measured 2x FA2 on H100); PyTorch SDPA elsewhere. Never an FP8 backend:
    `fp8` was measured no faster; `cudnn_fp8` is faster only at Wan sizes (1.24-1.38x on an H100,
    0.87x at Z-Image) and its error (6% Gaussian, 16-19% with outlier channels) misses the 3% /
    4.5% it would need to be a default."""
    if torch.version.hip is not None and _fa2_available() is None:
        return "flash_attn_2", "ROCm with flash-attn installed"
    if torch.cuda.is_available() and torch.version.cuda is not None:
        cap = torch.cuda.get_device_capability()
        if cap >= (9, 0):
            return "sdpa_cudnn", f"NVIDIA sm_{cap[0]}{cap[1]}: cuDNN attention is the fastest measured"
    return "sdpa", "PyTorch SDPA (no faster backend known for this device)"


# ---- the override ------------------------------------------------------------------------
_ARG_NAMES = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


class AttentionOverride:
    """`transformer_options["optimized_attention_override"]` for one model and one backend.

    Called as `override(func, *args, **kwargs)` with ComfyUI's attention signature
    (q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
    skip_output_reshape=False, **kwargs). Fallbacks call `func(*args, **kwargs)` unchanged.
    ModelPatcher.clone() deep-copies model_options, so every clone has its own warning state.
    """

    def __init__(self, backend_name: str, model_label: str = "model"):
        self.backend_name = backend_name
        self.model_label = model_label
        self.warned: set[str] = set()

    def _fallback(self, reason: str, func, args, kwargs):
        if reason not in self.warned:
            self.warned.add(reason)
            log.warning(
                "OnlineQuant attention %s on %s: %s; using ComfyUI's attention for such calls (warned once)",
                self.backend_name, self.model_label, reason,
            )  # fmt: skip
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        backend = ATTENTION_BACKENDS.get(self.backend_name)
        # equal lengths: Dynamo in torch 2.9 rejects zip(strict=False) over unequal lengths
        n = min(len(args), len(_ARG_NAMES))
        a = dict(zip(_ARG_NAMES[:n], args[:n], strict=True))
        for n in _ARG_NAMES:
            if n in kwargs:
                a[n] = kwargs[n]
        if backend is None or any(n not in a for n in ("q", "k", "v", "heads")):
            why = f"backend {self.backend_name!r} not registered or unknown call"
            return self._fallback(why, func, args, kwargs)
        q, k, v, heads = a["q"], a["k"], a["v"], a["heads"]
        mask = a.get("mask")
        skip_reshape = bool(a.get("skip_reshape", False))
        skip_output_reshape = bool(a.get("skip_output_reshape", False))
        if skip_reshape:
            b, _, _, d = q.shape
            qh, kh, vh = q, k, v
        else:
            b, _, hd = q.shape
            d = hd // heads
            qh, kh, vh = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        reason = backend.unsupported(qh, kh, vh, mask)
        if reason is not None:
            return self._fallback(reason, func, args, kwargs)
        out = backend.run(qh, kh, vh, mask) if backend.handles_mask else backend.run(qh, kh, vh)
        if skip_output_reshape:
            return out
        return out.transpose(1, 2).reshape(b, -1, heads * d)


def apply_attention_backend(model, backend: str):
    """A clone of `model` (ComfyUI ModelPatcher) using `backend`; the input is unchanged.
    -> (clone, resolved backend name, reason text)."""
    if backend not in backend_choices():
        known = ", ".join(backend_choices())
        raise BackendUnavailableError(f"unknown attention backend {backend!r}; choose one of {known}")
    reason = "chosen in the node"
    if backend == AUTO:
        backend, reason = resolve_auto()
    m = model.clone()
    topts = m.model_options.setdefault("transformer_options", {})
    if backend == COMFY_DEFAULT:
        topts.pop("optimized_attention_override", None)
        return m, backend, "ComfyUI's own attention (no override)"
    why_not = ATTENTION_BACKENDS[backend].available()
    if why_not is not None:
        raise BackendUnavailableError(f"Attention Backend (Online Quant): {why_not}")
    label = type(getattr(m.model, "diffusion_model", m.model)).__name__
    topts["optimized_attention_override"] = AttentionOverride(backend, label)
    log.info("OnlineQuant attention: %s uses %s (%s)", label, backend, reason)
    return m, backend, reason
