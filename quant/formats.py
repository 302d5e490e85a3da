"""The weight formats, as registered objects: everything format-specific lives on them.

Other modules never branch on a format name: they call `get_format(name)` and use its fields and
methods (`quantize`, `dequantize`, `packed_nbytes`, `unsupported_reason`, `kind`, `computes`).

| name               | data                  | scale                         | bits/weight       |
|--------------------|-----------------------|-------------------------------|-------------------|
| fp8_e4m3fn         | float8_e4m3fn [N, K]  | fp32 [N, 1] per output channel| 8 (+32 per row)   |
| fp8_e4m3fnuz       | float8_e4m3fnuz [N,K] | fp32 [N, 1] (MI300 / gfx942)  | 8 (+32 per row)   |
| fp8_e4m3fn_tensor  | float8_e4m3fn [N, K]  | fp32 [] one per tensor        | 8 (+32 per layer) |
| mxfp4              | uint8 codes [N, K/2]  | uint8 E8M0 [N, K/32]          | 4.25              |
| mxfp4_ocp          | as mxfp4, OCP FLOOR scale rounding, ties-to-even elements        | 4.25 |
Aliases: "fp8" -> fp8_e4m3fn, "fp8_fnuz" -> fp8_e4m3fnuz, "mxfp4_even"/"mxfp4_aiter" -> mxfp4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fp8, mxfp4
from .constants import MX_BLOCK_SIZE, MXFP4_BITS_PER_WEIGHT


@dataclass(frozen=True, eq=False)  # eq=False: identity semantics; comparing tensors has no single truth
class QuantizedWeight:
    """A quantized Linear weight: logical shape (N, K) = (out_features, in_features)."""

    format: str  # a key of FORMATS
    qdata: torch.Tensor  # fp8 [N, K] or uint8 codes [N, K//2]
    scale: torch.Tensor  # fp32 [N, 1] (fp8 channel) / [] (fp8 tensor) / uint8 E8M0 [N, K//32] (mxfp4)
    shape: tuple[int, int]  # logical (N, K)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def nbytes(self) -> int:
        """Bytes actually held (data + scales)."""
        return self.qdata.numel() * self.qdata.element_size() + self.scale.numel() * self.scale.element_size()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedWeight:
        """A copy on another device (a new object; the format and shape are unchanged)."""
        return QuantizedWeight(
            self.format,
            self.qdata.to(device, non_blocking=non_blocking),
            self.scale.to(device, non_blocking=non_blocking),
            self.shape,
        )

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return get_format(self.format).dequantize(self, dtype)


@dataclass(frozen=True)
class WeightFormat:
    """Base of a weight format. `kind` ("fp8" / "mxfp4") selects the torch.library op and backends;
    `computes` lists the compute modes a quantized_linear may run in, preferred first."""

    name: str
    bits_per_weight: float
    min_in_multiple: int
    kind: str
    computes: tuple[str, ...]
    description: str = ""

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        raise NotImplementedError

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        raise NotImplementedError

    def packed_nbytes(self, out_features: int, in_features: int) -> int:
        raise NotImplementedError

    def dequantize_rows(self, qw: QuantizedWeight, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Output channels start:stop of the weight, dequantized to dtype (for chunked matmuls)."""
        raise NotImplementedError

    def dequantize_rows_unscaled(
        self, qw: QuantizedWeight, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows start:stop as fp32 plus the per-output-channel scale still to apply after the
        accumulation ([rows, 1], [] or None when already applied), as a scaled GEMM would."""
        return self.dequantize_rows(qw, start, stop, torch.float32), None

    def unsupported_reason(self, out_features: int, in_features: int) -> str | None:
        """None when a Linear of this shape can be stored in this format, else why not."""
        if out_features <= 0 or in_features <= 0:
            return f"empty weight ({out_features}x{in_features})"
        if in_features % self.min_in_multiple:
            return (
                f"in_features {in_features} is not a multiple of {self.min_in_multiple} "
                f"(required by {self.name})"
            )
        return None

    def _check_weight(self, w: torch.Tensor) -> tuple[int, int]:
        if w.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
        n, k = w.shape
        reason = self.unsupported_reason(n, k)
        if reason:
            raise ValueError(f"{self.name} cannot store a {n}x{k} weight: {reason}")
        return n, k


@dataclass(frozen=True)
class Fp8Format(WeightFormat):
    dtype: torch.dtype = torch.float8_e4m3fn
    granularity: str = "channel"

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        n, k = self._check_weight(w)
        q, scale = fp8.quantize_weight(w, self.dtype, self.granularity)
        return QuantizedWeight(self.name, q, scale, (n, k))

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return fp8.dequantize(qw.qdata, qw.scale, dtype)

    def _row_scale(self, qw: QuantizedWeight, start: int, stop: int) -> torch.Tensor:
        return qw.scale[start:stop] if self.granularity == "channel" else qw.scale

    def dequantize_rows(self, qw: QuantizedWeight, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return fp8.dequantize(qw.qdata[start:stop], self._row_scale(qw, start, stop), dtype)

    def dequantize_rows_unscaled(
        self, qw: QuantizedWeight, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return qw.qdata[start:stop].float(), self._row_scale(qw, start, stop)

    def packed_nbytes(self, out_features: int, in_features: int) -> int:
        scales = out_features if self.granularity == "channel" else 1
        return out_features * in_features + 4 * scales


@dataclass(frozen=True)
class Mxfp4Format(WeightFormat):
    rounding: str = "even"

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        n, k = self._check_weight(w)
        codes, scales = mxfp4.quantize(w, self.rounding)
        return QuantizedWeight(self.name, codes, scales, (n, k))

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return mxfp4.dequantize(qw.qdata, qw.scale, dtype)

    def dequantize_rows(self, qw: QuantizedWeight, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return mxfp4.dequantize(qw.qdata[start:stop], qw.scale[start:stop], dtype)

    def packed_nbytes(self, out_features: int, in_features: int) -> int:
        return out_features * (in_features // 2 + in_features // MX_BLOCK_SIZE)


FP8_COMPUTES = ("w8a8", "w8a16")
MXFP4_COMPUTES = ("w4a4", "w4a8", "w4a16")

_FP8 = {"bits_per_weight": 8.0, "min_in_multiple": 1, "kind": "fp8", "computes": FP8_COMPUTES}
_MX = {"bits_per_weight": MXFP4_BITS_PER_WEIGHT, "min_in_multiple": MX_BLOCK_SIZE, "kind": "mxfp4",
       "computes": MXFP4_COMPUTES}

FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        Fp8Format(name="fp8_e4m3fn", dtype=torch.float8_e4m3fn, granularity="channel", **_FP8,
                  description="FP8 e4m3fn, one fp32 scale per output channel (NVIDIA sm_89+, MI350)"),
        Fp8Format(name="fp8_e4m3fnuz", dtype=torch.float8_e4m3fnuz, granularity="channel", **_FP8,
                  description="FP8 e4m3fnuz (max 240), one fp32 scale per output channel (MI300 / gfx942)"),
        Fp8Format(name="fp8_e4m3fn_tensor", dtype=torch.float8_e4m3fn, granularity="tensor", **_FP8,
                  description="FP8 e4m3fn, one fp32 scale per tensor (as ComfyUI's scaled fp8)"),
        Mxfp4Format(name="mxfp4", rounding="even", **_MX,
                    description="MXFP4 (OCP MX v1.0), AITER dynamic_mxfp4_quant rounding, bit-exact"),
        Mxfp4Format(name="mxfp4_ocp", rounding="floor", **_MX,
                    description="MXFP4 with OCP MX v1.0 / torchao FLOOR scale rounding (ties to even)"),
    )
}

ALIASES: dict[str, str] = {
    "fp8": "fp8_e4m3fn",
    "fp8_fnuz": "fp8_e4m3fnuz",
    "mxfp4_even": "mxfp4",
    "mxfp4_aiter": "mxfp4",
}


def get_format(name: str) -> WeightFormat:
    """The registered format named `name` (or an alias); unknown names raise ValueError listing them."""
    key = ALIASES.get(name, name)
    try:
        return FORMATS[key]
    except (KeyError, TypeError):
        known = ", ".join(sorted(FORMATS)) + "; aliases: " + ", ".join(sorted(ALIASES))
        raise ValueError(f"unknown quantization format {name!r}; known formats: {known}") from None


def quantize_weight(w: torch.Tensor, format: str) -> QuantizedWeight:
    """Shorthand for get_format(format).quantize(w)."""
    return get_format(format).quantize(w)


__all__ = [
    "ALIASES",
    "FORMATS",
    "Fp8Format",
    "Mxfp4Format",
    "QuantizedWeight",
    "WeightFormat",
    "get_format",
    "quantize_weight",
]
