"""FP8 (e4m3fn / e4m3fnuz) reference quantization with fp32 scales.

Weights: one scale per output channel (row of [N, K]) or per tensor; activations: one scale per
token (row), computed dynamically. `x ≈ q.float() * scale` with
scale = max(amax, 1e-12) / fp8_max, and values clamped to ±fp8_max before the cast (PyTorch's
cast saturates for e4m3fn but gives NaN for e4m3fnuz out of range).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constants import AMAX_EPS, FP8_MAX
from ..errors import NonFiniteWeightError
from .base import QuantizedWeight, WeightFormat, register_format

GRANULARITIES = ("channel", "tensor")
FP8_DTYPES = tuple(FP8_MAX)

# Rows per chunk are chosen so each fp32 temporary stays around 16 MiB: small next to any model,
# yet large enough that on a CPU the allocator does not hand each temporary back to the OS and
# page-fault it in again (4 MiB chunks made an [14336x3072] weight 3.5x slower to quantize).
_CHUNK_ELEMS = 1 << 22


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype this pack supports (ValueError otherwise)."""
    try:
        return FP8_MAX[dtype]
    except KeyError:
        raise ValueError(f"unsupported FP8 dtype {dtype}; expected one of {FP8_DTYPES}") from None


def _cast(x32: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype, fmax: float) -> torch.Tensor:
    return (x32 * inv_scale).clamp_(-fmax, fmax).to(dtype)


def _row_chunks(n_rows: int, k: int):
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    return range(0, n_rows, step), step


def _row_amax(w: torch.Tensor) -> torch.Tensor:
    """fp32 [N, 1] max |w| per row, in row chunks (no full-size |w| temporary)."""
    n, k = w.shape
    amax = torch.zeros((n, 1), dtype=torch.float32, device=w.device)
    if k == 0:
        return amax
    starts, step = _row_chunks(n, k)
    for i in starts:
        lo, hi = torch.aminmax(w[i : i + step], dim=1, keepdim=True)
        torch.maximum(hi.float(), lo.float().neg_(), out=amax[i : i + step])
    return amax


def quantize_weight(
    w: torch.Tensor,
    dtype: torch.dtype = torch.float8_e4m3fn,
    granularity: str = "channel",
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight [N, K] to FP8. Returns (q [N, K] in dtype, scale fp32 [N, 1] or []).

    NaN/Inf raise NonFiniteWeightError (the caller adds the layer name); with check_finite=False
    they give a non-finite scale instead (no synchronisation; `Fp8Format.finite` reads it).
    """
    fmax = fp8_max(dtype)
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown FP8 granularity {granularity!r}; expected one of {GRANULARITIES}")
    if w.dim() != 2:
        raise ValueError(
            f"FP8 weight quantization expects a 2-D [out, in] weight, got shape {tuple(w.shape)}"
        )
    if not w.is_floating_point():
        raise TypeError(f"FP8 quantizes floating-point tensors, got {w.dtype}")
    n, k = w.shape
    amax = _row_amax(w)  # chunked: no full-size |w| temporary while a big layer loads
    if check_finite and not bool(torch.isfinite(amax).all()):  # NaN and Inf propagate into amax
        raise NonFiniteWeightError("weight contains NaN or Inf values; FP8 cannot quantize it")
    if granularity == "tensor":
        amax = amax.amax() if n else amax.new_zeros(())
    # Divide in fp32 like the reference recipes (torchao, sglang): scale = amax / max.
    scale = amax.clamp(min=AMAX_EPS) / fmax
    inv = 1.0 / scale
    q = torch.empty((n, k), dtype=dtype, device=w.device)
    starts, step = _row_chunks(n, k)
    for i in starts:
        inv_i = inv if granularity == "tensor" else inv[i : i + step]
        q[i : i + step] = _cast(w[i : i + step].float(), inv_i, dtype, fmax)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 q [N, K] (or [..., K]) with a broadcastable fp32 scale -> q * scale in dtype."""
    if q.dtype not in FP8_MAX:
        raise TypeError(f"expected an FP8 tensor ({FP8_DTYPES}), got {q.dtype}")
    if q.dim() < 2:
        return (q.float() * scale.float()).to(dtype)
    k = q.shape[-1]
    q2 = q.reshape(-1, k)
    s2 = scale.float()
    per_row = s2.dim() > 0 and s2.numel() > 1
    if per_row:
        s2 = s2.reshape(-1, 1)
    out = torch.empty(q2.shape, dtype=dtype, device=q.device)
    starts, step = _row_chunks(q2.shape[0], k)
    for i in starts:
        s_i = s2[i : i + step] if per_row else s2
        out[i : i + step] = q2[i : i + step].float() * s_i
    return out.view(q.shape)


def quantize_activation(
    x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization (the reference every fused kernel must match).

    x [..., K] -> (q [..., K] in dtype, scale fp32 [..., 1]). NaN in x propagates (no error: an
    activation is not user input). The arithmetic is identical to quantize_weight's per-channel
    path: scale = max(amax, 1e-12) / fp8_max, q = clamp(x * (1 / scale)).
    """
    fmax = fp8_max(dtype)
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)
    scale = amax.clamp(min=AMAX_EPS) / fmax
    return _cast(x32, 1.0 / scale, dtype, fmax), scale


@dataclass(frozen=True)
class Fp8Format(WeightFormat):
    dtype: torch.dtype = torch.float8_e4m3fn
    granularity: str = "channel"

    def quantize(self, w: torch.Tensor, *, check_finite: bool = True) -> QuantizedWeight:
        n, k = self._check_weight(w)
        q, scale = quantize_weight(w, self.dtype, self.granularity, check_finite=check_finite)
        return QuantizedWeight(self.name, q, scale, (n, k))

    def finite(self, qw: QuantizedWeight) -> torch.Tensor:
        return torch.isfinite(qw.scale).all()  # a NaN/Inf reaches the scale through amax

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize(qw.qdata, qw.scale, dtype)

    def dequantize_unchunked(self, qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        s = qw.scale.float()
        return (qw.qdata.float() * (s.reshape(-1, 1) if s.numel() > 1 else s)).to(dtype)

    def _row_scale(self, qw: QuantizedWeight, start: int, stop: int) -> torch.Tensor:
        return qw.scale[start:stop] if self.granularity == "channel" else qw.scale

    def dequantize_rows(self, qw: QuantizedWeight, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(qw.qdata[start:stop], self._row_scale(qw, start, stop), dtype)

    def dequantize_rows_unscaled(
        self, qw: QuantizedWeight, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return qw.qdata[start:stop].float(), self._row_scale(qw, start, stop)

    def quantize_activation_values(
        self, x: torch.Tensor, bits: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if bits != "8":
            return super().quantize_activation_values(x, bits)
        q, scale = quantize_activation(x, self.dtype)  # fnuz weights pair with fnuz activations
        return q.float(), scale

    def packed_nbytes(self, out_features: int, in_features: int) -> int:
        scales = out_features if self.granularity == "channel" else 1
        return out_features * in_features + 4 * scales

    def packed_layout(self, out_features: int, in_features: int):
        scale = (out_features, 1) if self.granularity == "channel" else ()
        return ((out_features, in_features), self.dtype), (scale, torch.float32)


FP8_COMPUTES = ("w8a8", "w8a16")
_COMMON = {"bits_per_weight": 8.0, "min_in_multiple": 1, "kind": "fp8", "computes": FP8_COMPUTES}

register_format(
    Fp8Format(
        name="fp8_e4m3fn",
        dtype=torch.float8_e4m3fn,
        granularity="channel",
        **_COMMON,
        description="FP8 e4m3fn, one fp32 scale per output channel (NVIDIA sm_89+, MI350)",
    ),
    "fp8",
)
register_format(
    Fp8Format(
        name="fp8_e4m3fnuz",
        dtype=torch.float8_e4m3fnuz,
        granularity="channel",
        **_COMMON,
        description="FP8 e4m3fnuz (max 240), one fp32 scale per output channel (MI300 / gfx942)",
    ),
    "fp8_fnuz",
)
register_format(
    Fp8Format(
        name="fp8_e4m3fn_tensor",
        dtype=torch.float8_e4m3fn,
        granularity="tensor",
        **_COMMON,
        description="FP8 e4m3fn, one fp32 scale per tensor (as ComfyUI's scaled fp8)",
        # ComfyUI's float8_e4m3fn layout: a scalar fp32 `weight_scale`, dequantized as q * scale
        comfyui_name="float8_e4m3fn",
    ),
)


__all__ = [
    "FP8_COMPUTES",
    "FP8_DTYPES",
    "Fp8Format",
    "GRANULARITIES",
    "dequantize",
    "fp8_max",
    "quantize_activation",
    "quantize_weight",
]
