"""MXFP4 (OCP MX v1.0) reference quantization: E2M1 codes + one E8M0 scale per 32 elements.

Layout: `codes` uint8 [..., K//2], two E2M1 codes per byte with the EVEN
element in the LOW nibble; `scales` uint8 [..., K//32], E8M0 (bias 127). A code's bit 3 is the
sign and is kept even when the magnitude rounds to zero (-0.0 and -0.1*scale give 0x8).

Rounding modes (`rounding=`), each named by the scale rule and the element tie rule:
- "even" (default): AMD AITER's MXFP4 quantizer, bit for bit, as it is from AITER tag v0.1.12
  through v0.1.20.post1 (and on its main branch at v0.1.20-46-ge4048607a5):
  `aiter/utility/fp4_utils.py` `dynamic_mxfp4_quant`, and the Triton `_mxfp4_quant_op`
  (`aiter/ops/triton/_triton_kernels/quant.py`, later `.../quant/quant.py`) from v0.1.8.
  Scale: amax's fp32 bits + 0x200000, masked to sign+exponent (0xFF800000), exponent =
  floor(log2) - 2 clamped to [-127, 127] -- a block whose amax mantissa is >= 1.75 takes the next
  power of two. Elements: round to nearest, ties to EVEN, saturating at 6.
- "even_ties_away": the same scale with elements rounded to nearest, ties AWAY from zero: AITER's
  older element rounding ("tie breaking up") in `fp4_utils.dynamic_mxfp4_quant` up to tag v0.1.11
  and in the Triton `_mxfp4_quant_op` up to v0.1.7. It differs from "even" only on exact ties
  (e.g. 2.5 -> 3 instead of 2, 0.25 -> 0.5 instead of 0); kept to reproduce those releases.
- "floor": OCP MX v1.0 §6.3 / torchao FLOOR: exponent = floor(log2(amax)) - 2; elements round to
  nearest, ties to even, saturating at 6 (a block whose amax mantissa > 1.5 saturates its top).
- "ceil": torchao RCEIL: the smallest exponent with amax * 2^-exponent <= 6; ties to even.
An all-zero block gets exponent -127, i.e. scale byte 0, in every mode.

Finite in, finite out: every mode caps the shared exponent at MXFP4_MAX_EXP = 125, the largest
at which the top element 6 * 2^e is finite (1.5 * 2^127; 6 * 2^126 overflows fp32 and bf16).
Only blocks whose amax is above 1.5 * 2^127 (~2.55e38) can reach it: "ceil" would pick 126 for
amax > 1.5 * 2^127 and "even" 127 for amax >= 1.75 * 2^127 (~2.98e38), where AITER (every tag
above) carries amax into +inf, clamps log2(inf) to 127 and writes scale byte 254; its codes
x * 2^-127 in [1.75, 2) round to 2.0, which dequantizes to 2^128 = +inf. Here such a block gets
byte 252 and saturates its top elements to +-6 (+-1.5 * 2^127, the largest finite MXFP4 value);
every block with amax < 1.75 * 2^127 stays bit-identical to AITER.

Everything is computed on integer views of fp32 values, vectorised, in row chunks so that a
5120x13824 weight never needs more than a few MB of fp32 temporaries at a time. Encoding goes
through code tables built from `_round_e2m1` (the bit-level definition; a test checks the two
agree on random fp32 patterns); decoding through a 256-entry byte -> (even, odd) value table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constants import (
    AITER_AMAX_MASK,
    AITER_AMAX_ROUND_ADD,
    E2M1_EMAX,
    E2M1_VALUES,
    E8M0_BIAS,
    E8M0_MAX_EXP,
    E8M0_MIN_EXP,
    E8M0_NAN,
    MX_BLOCK_SIZE,
    MXFP4_BITS_PER_WEIGHT,
    MXFP4_MAX_EXP,
)
from ..errors import NonFiniteWeightError
from . import fp8
from .base import QuantizedWeight, WeightFormat, register_format

ROUNDING_MODES = ("even", "even_ties_away", "floor", "ceil")
_AITER_SCALE = ("even", "even_ties_away")  # modes with AITER's amax-rounding scale rule

# Elements per chunk: 8 Mi fp32 = 32 MiB per temporary (a few at a time): small next to any model,
# and large enough that on a CPU the temporaries are reused rather than page-faulted in afresh
# each chunk (1 Mi made a [14336x3072] weight 2x slower to quantize).
_CHUNK_ELEMS = 1 << 23

_MANT_MASK = 0x007FFFFF
_NATIVE = (torch.float32, torch.bfloat16, torch.float16)  # dtypes quantized without an fp32 copy
_ABS_MASK = 0x7FFFFFFF


def _as_int32_const(v: int) -> int:
    """An unsigned 32-bit pattern as the signed int32 value torch stores it as."""
    return v - (1 << 32) if v >= 1 << 31 else v


def _check_shape(w: torch.Tensor, what: str = "tensor") -> int:
    if w.dim() == 0 or w.shape[-1] % MX_BLOCK_SIZE != 0:
        k = w.shape[-1] if w.dim() else "a 0-d tensor"
        raise ValueError(
            f"MXFP4 needs the last dimension of the {what} to be a multiple of {MX_BLOCK_SIZE} "
            f"(the MX block size); got {k} (shape {tuple(w.shape)})"
        )
    return w.shape[-1]


def _block_exponent(amax: torch.Tensor, rounding: str) -> torch.Tensor:
    """Shared exponent (int32, in [-127, MXFP4_MAX_EXP]) of each block from its fp32 amax (>= 0).

    A non-finite amax (activations only) gets some exponent in range; its block's scale byte is
    then overwritten with the E8M0 NaN."""
    bits = amax.view(torch.int32)
    if rounding in _AITER_SCALE:
        # AITER: round amax's mantissa at its top bit, keep sign+exponent. amax is >= 0, so the
        # int32 add cannot overflow; amaxes >= 1.75 * 2^127 carry into the all-ones exponent
        # (+inf), where AITER's exponent would be 127 and the clamp below takes over.
        # biased 0 means 0 or subnormal (log2 < -126): below the lower clamp either way.
        r = (bits + AITER_AMAX_ROUND_ADD) & _as_int32_const(AITER_AMAX_MASK)
        e = (r >> 23) - 127 - E2M1_EMAX
    elif rounding == "floor":
        e = (bits >> 23) - 127 - E2M1_EMAX
    elif rounding == "ceil":
        # amax = m * 2^E, m in [1, 2): m <= 1.5 fits 6 with E-2, m > 1.5 needs E-1.
        e = (bits >> 23) - 127 - E2M1_EMAX + ((bits & _MANT_MASK) > 0x400000).to(torch.int32)
    else:
        raise ValueError(f"unknown MXFP4 rounding {rounding!r}; expected one of {ROUNDING_MODES}")
    # Upper bound MXFP4_MAX_EXP (not E8M0's 127): a finite block must dequantize finite.
    return e.clamp_(E8M0_MIN_EXP, MXFP4_MAX_EXP)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact 2^e as fp32 for int32 e in [-127, 127] (2^-127 is an fp32 subnormal)."""
    normal = ((e + 127).clamp_(min=1) << 23).view(torch.float32)
    return torch.where(e == -127, torch.full_like(normal, 2.0**-127), normal)


def _round_e2m1(y: torch.Tensor, ties_away: bool) -> torch.Tensor:
    """4-bit E2M1 codes (uint8, sign in bit 3) of fp32 y, round to nearest, saturating at 6."""
    bits = y.view(torch.int32)
    sign = (bits < 0).to(torch.uint8) << 3
    a_bits = bits & _ABS_MASK
    a = a_bits.view(torch.float32)
    # Normal range (|y| >= 1): keep 1 mantissa bit. (bits >> 22) = fp32 exponent << 1 | mantissa
    # bit; E2M1's exponent bias is 1 so its code is that minus (127 - 1) << 1.
    # Ties away: add half an ulp of the kept bit. Ties to even: just under half, plus the kept bit.
    half = (1 << 21) if ties_away else ((1 << 21) - 1) + ((a_bits >> 22) & 1)
    rounded = a_bits + half
    normal = ((rounded >> 22) - (126 << 1)).clamp_(max=7)
    # Subnormal range (|y| < 1): codes 0 (0), 1 (0.5), 2 (1.0); midpoints 0.25 and 0.75.
    if ties_away:
        sub = (a >= 0.25).to(torch.int32) + (a >= 0.75).to(torch.int32)
    else:  # 0.25 ties to 0 (even code), 0.75 ties to 1.0 (code 2, even)
        sub = (a > 0.25).to(torch.int32) + (a >= 0.75).to(torch.int32)
    code = torch.where(a < 1.0, sub, normal).to(torch.uint8)
    return code | sign


def _lut_index(y: torch.Tensor, ties_away: bool) -> torch.Tensor:
    """Index of each fp32 y into its code table. Round-half-away needs only the top 16 bits
    (sign, exponent, mantissa bit, half bit are bits 31..21); ties-to-even also needs the sticky
    bit (any of bits 20..0 set)."""
    bits = y.view(torch.int32)
    if ties_away:
        return (bits >> 16).bitwise_and_(0xFFFF)
    idx = (bits >> 20).bitwise_and_(0xFFE)
    return idx.bitwise_or_((bits & 0x1FFFFF) != 0)


_LUTS: dict[tuple[str, bool], torch.Tensor] = {}


def _code_table(device: torch.device, ties_away: bool) -> torch.Tensor:
    """E2M1 code of every _lut_index value, made by _round_e2m1 itself from one representative
    bit pattern per index (so the fast path cannot disagree with the definition)."""
    key = (str(device), ties_away)
    lut = _LUTS.get(key)
    if lut is None:
        i = torch.arange(65536 if ties_away else 4096, dtype=torch.int64)
        rep = (i << 16) if ties_away else (((i >> 1) << 21) | (i & 1))
        rep = torch.where(rep >= 1 << 31, rep - (1 << 32), rep).to(torch.int32)  # sign bit
        lut = _round_e2m1(rep.view(torch.float32), ties_away).to(device)
        _LUTS[key] = lut
    return lut


def _quantize_rows(
    x: torch.Tensor, rounding: str, check_finite: bool, codes_out: torch.Tensor, scales_out: torch.Tensor
) -> None:
    """x: float [R, K] contiguous (bf16/fp16/fp32) -> codes_out uint8 [R, K//2], scales_out [R, K//32]."""
    r, k = x.shape
    blocks = x.view(r, k // MX_BLOCK_SIZE, MX_BLOCK_SIZE)
    lo, hi = torch.aminmax(blocks, dim=-1)  # NaN and Inf propagate into amax: one cheap check
    amax = torch.maximum(hi.float(), lo.float().neg_())
    amax = (amax.view(torch.int32) & _ABS_MASK).view(torch.float32)  # -0.0 -> +0.0
    if check_finite and not bool(torch.isfinite(amax).all()):
        raise NonFiniteWeightError("weight contains NaN or Inf values; MXFP4 cannot quantize it")
    e = _block_exponent(amax, rounding)
    # Exact: a power-of-two scaling, computed in fp32 (bf16/fp16 blocks promote in the multiply).
    y = (blocks * _pow2(-e).unsqueeze(-1)).view(r, k)
    ties_away = rounding == "even_ties_away"
    codes = _code_table(x.device, ties_away).index_select(0, _lut_index(y, ties_away).view(-1))
    codes = codes.view(r, k)
    torch.bitwise_or(codes[:, 0::2], codes[:, 1::2] << 4, out=codes_out)  # even -> low nibble
    scales = (e + E8M0_BIAS).to(torch.uint8)
    if not check_finite:  # activations: a block holding NaN/Inf gets the E8M0 NaN scale (0xFF)
        scales.masked_fill_(~torch.isfinite(amax), E8M0_NAN)
    scales_out.copy_(scales)


def quantize(
    w: torch.Tensor, rounding: str = "even", *, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float tensor [..., K] (K a multiple of 32) to MXFP4.

    Returns (codes uint8 [..., K//2], scales uint8 E8M0 [..., K//32]) on w's device.
    NaN/Inf raise NonFiniteWeightError (the caller adds the layer name); `check_finite=False`
    is for activations, where a NaN should propagate rather than raise.
    """
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"unknown MXFP4 rounding {rounding!r}; expected one of {ROUNDING_MODES}")
    if not w.is_floating_point():
        raise TypeError(f"MXFP4 quantizes floating-point tensors, got {w.dtype}")
    k = _check_shape(w)
    lead = w.shape[:-1]
    rows = w.reshape(-1, k)
    n_rows = rows.shape[0]
    codes = torch.empty((n_rows, k // 2), dtype=torch.uint8, device=w.device)
    scales = torch.empty((n_rows, k // MX_BLOCK_SIZE), dtype=torch.uint8, device=w.device)
    step = max(1, _CHUNK_ELEMS // k)
    for i in range(0, n_rows, step):
        chunk = rows[i : i + step]
        chunk = chunk.contiguous() if chunk.dtype in _NATIVE else chunk.to(torch.float32).contiguous()
        _quantize_rows(chunk, rounding, check_finite, codes[i : i + step], scales[i : i + step])
    return codes.view(*lead, k // 2), scales.view(*lead, k // MX_BLOCK_SIZE)


def _scale_table(device: torch.device) -> torch.Tensor:
    """fp32 value of every E8M0 byte: 2^(b - 127), 0xFF -> NaN (OCP MX v1.0 §5.4.1)."""
    e = torch.arange(256, dtype=torch.int32, device=device) - E8M0_BIAS
    t = _pow2(e.clamp(max=E8M0_MAX_EXP))
    t[E8M0_NAN] = float("nan")
    return t


def _byte_table(device: torch.device) -> torch.Tensor:
    """fp32 [256, 2]: the (even, odd) element values of every packed byte (low nibble first)."""
    b = torch.arange(256)
    vals = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    return torch.stack((vals[b & 0xF], vals[b >> 4]), dim=1).to(device)


def _dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, stable: torch.Tensor):
    r, half = codes.shape
    vals = table.index_select(0, codes.reshape(-1).to(torch.int32)).view(r, -1, MX_BLOCK_SIZE)
    block_scale = stable.index_select(0, scales.reshape(-1).to(torch.int32)).view(r, -1, 1)
    return vals.mul_(block_scale).view(r, half * 2)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """MXFP4 codes uint8 [..., K//2] + E8M0 scales uint8 [..., K//32] -> tensor [..., K] in dtype.

    Exact in fp32 (every E2M1 value times a power of two), then one cast to `dtype`.
    """
    if codes.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 codes and scales must be uint8, got {codes.dtype} and {scales.dtype}")
    k = codes.shape[-1] * 2
    if k % MX_BLOCK_SIZE or scales.shape[:-1] != codes.shape[:-1] or scales.shape[-1] != k // MX_BLOCK_SIZE:
        raise ValueError(
            f"MXFP4 codes {tuple(codes.shape)} and scales {tuple(scales.shape)} do not match: "
            f"expected scales [..., {k // MX_BLOCK_SIZE}] for K={k}"
        )
    lead = codes.shape[:-1]
    c2 = codes.reshape(-1, k // 2)
    s2 = scales.reshape(-1, k // MX_BLOCK_SIZE)
    table = _byte_table(codes.device)
    stable = _scale_table(codes.device)
    out = torch.empty((c2.shape[0], k), dtype=dtype, device=codes.device)
    step = max(1, _CHUNK_ELEMS // k)
    for i in range(0, c2.shape[0], step):
        out[i : i + step] = _dequantize_rows(c2[i : i + step], s2[i : i + step], table, stable)
    return out.view(*lead, k)


@dataclass(frozen=True)
class Mxfp4Format(WeightFormat):
    rounding: str = "even"

    def quantize(self, w: torch.Tensor, *, check_finite: bool = True) -> QuantizedWeight:
        n, k = self._check_weight(w)
        codes, scales = quantize(w, self.rounding, check_finite=check_finite)
        return QuantizedWeight(self.name, codes, scales, (n, k))

    def finite(self, qw: QuantizedWeight) -> torch.Tensor:
        # unchecked, a block holding NaN/Inf gets the E8M0 NaN scale, which finite blocks never
        # get (their exponent is capped well below it)
        return (qw.scale.view(torch.uint8) != E8M0_NAN).all()

    def packed_finite(self, qw: QuantizedWeight) -> torch.Tensor:
        return self.finite(qw)  # E2M1 codes are all finite: only a NaN block scale decodes to NaN

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize(qw.qdata, qw.scale, dtype)

    def dequantize_rows(self, qw: QuantizedWeight, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(qw.qdata[start:stop], qw.scale[start:stop], dtype)

    def dequantize_unchunked(self, qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        dev = qw.qdata.device
        return _dequantize_rows(qw.qdata, qw.scale, _byte_table(dev), _scale_table(dev)).to(dtype)

    def quantize_activation_values(
        self, x: torch.Tensor, bits: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if bits == "8":  # W4A8: FP8 e4m3fn per-token activations against the decoded weight
            q, scale = fp8.quantize_activation(x, torch.float8_e4m3fn)
            return q.float(), scale
        if bits == "4":  # W4A4: activations in MXFP4 with the weight's rounding (AITER's a4w4)
            codes, scales = quantize(x, self.rounding, check_finite=False)
            return dequantize(codes, scales, torch.float32), None
        return super().quantize_activation_values(x, bits)

    def packed_nbytes(self, out_features: int, in_features: int) -> int:
        return out_features * (in_features // 2 + in_features // MX_BLOCK_SIZE)

    def packed_layout(self, out_features: int, in_features: int):
        return (
            ((out_features, in_features // 2), torch.uint8),
            ((out_features, in_features // MX_BLOCK_SIZE), torch.uint8),
        )


MXFP4_COMPUTES = ("w4a4", "w4a8", "w4a16")
_COMMON = {
    "bits_per_weight": MXFP4_BITS_PER_WEIGHT,
    "min_in_multiple": MX_BLOCK_SIZE,
    "kind": "mxfp4",
    "computes": MXFP4_COMPUTES,
}

register_format(
    Mxfp4Format(
        name="mxfp4",
        rounding="even",
        **_COMMON,
        description="MXFP4 (OCP MX v1.0), AITER (v0.1.12+) dynamic_mxfp4_quant rounding, bit-exact",
    ),
    "mxfp4_even",
    "mxfp4_aiter",
)
register_format(
    Mxfp4Format(
        name="mxfp4_ocp",
        rounding="floor",
        **_COMMON,
        description="MXFP4 with OCP MX v1.0 / torchao FLOOR scale rounding (ties to even)",
    ),
)


__all__ = ["MXFP4_COMPUTES", "Mxfp4Format", "ROUNDING_MODES", "dequantize", "quantize"]
