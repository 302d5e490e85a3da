"""Numeric constants of the formats, each with the place it comes from.

OCP MX v1.0 = "OCP Microscaling Formats (MX) Specification v1.0" (Sept 2023), sections 5.1-5.3
and 6.3; AMD AITER (github.com/ROCm/aiter) `aiter/utility/fp4_utils.py` for its MXFP4 scale
rounding, the same in every tag from v0.1.3 through v0.1.20.post1.
"""

from __future__ import annotations

import torch

# --- FP8 (OCP 8-bit floating point, e4m3 variants) -------------------------------------------
# Largest finite e4m3fn value: S.1111.110 = 1.75 * 2^8 (the all-ones pattern is NaN).
FP8_E4M3FN_MAX = 448.0
# e4m3fnuz (MI300 / gfx942): bias 8 instead of 7 and no negative zero, so its max is 1.875 * 2^7.
FP8_E4M3FNUZ_MAX = 240.0
FP8_MAX = {torch.float8_e4m3fn: FP8_E4M3FN_MAX, torch.float8_e4m3fnuz: FP8_E4M3FNUZ_MAX}

# amax is clamped to at least this before dividing by it, so an all-zero row/token gets a finite
# scale instead of 0/0.
AMAX_EPS = 1e-12

# --- MXFP4 (OCP MX v1.0) ----------------------------------------------------------------------
# Block size k = 32 elements share one scale (OCP MX v1.0 §5.2, Table 1).
MX_BLOCK_SIZE = 32
# E8M0 scale: 8 exponent bits, bias 127, no sign, no mantissa; 0xFF encodes NaN, there is no zero
# (OCP MX v1.0 §5.4.1). Representable scales are 2^-127 .. 2^127.
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127

# E2M1 element (OCP MX v1.0 §5.3.3): 1 sign, 2 exponent bits (bias 1), 1 mantissa bit.
# Magnitudes by 3-bit code: 0, 0.5 (subnormal), 1, 1.5, 2, 3, 4, 6. Code bit 3 is the sign.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES)  # indexed by the 4-bit code
E2M1_MAX = 6.0
E2M1_SIGN_BIT = 0x8
# floor(log2(E2M1_MAX)) = 2: the shared exponent is floor(log2(amax)) - 2 (OCP MX v1.0 §6.3).
E2M1_EMAX = 2

# Bits per MXFP4 weight: 4 data bits + one 8-bit scale per 32 elements = 4.25.
MXFP4_BITS_PER_WEIGHT = 4 + 8 / MX_BLOCK_SIZE

# The largest shared exponent whose top element stays finite: 6 * 2^125 = 1.5 * 2^127 is below
# fp32's and bf16's max (~2^128), 6 * 2^126 is not. E8M0 itself reaches 2^127, so a scale rule
# that picks 126 or 127 for a finite block would dequantize its top elements to +-inf.
MXFP4_MAX_EXP = 125

# AITER's dynamic_mxfp4_quant (aiter/utility/fp4_utils.py, every tag v0.1.3 .. v0.1.20.post1)
# rounds amax's fp32 bit pattern before taking its exponent: add 2^21 (half of the mantissa's
# top bit) and keep sign+exponent. A mantissa >= 1.75 thus carries into the next exponent.
AITER_AMAX_ROUND_ADD = 0x200000
AITER_AMAX_MASK = 0xFF800000
