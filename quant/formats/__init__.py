"""Weight formats, one module each, registered by name (see base.py).

| name               | data                  | scale                          | bits/weight       |
|--------------------|-----------------------|--------------------------------|-------------------|
| fp8_e4m3fn         | float8_e4m3fn [N, K]  | fp32 [N, 1] per output channel | 8 (+32 per row)   |
| fp8_e4m3fnuz       | float8_e4m3fnuz [N,K] | fp32 [N, 1] (MI300 / gfx942)   | 8 (+32 per row)   |
| fp8_e4m3fn_tensor  | float8_e4m3fn [N, K]  | fp32 [] one per tensor         | 8 (+32 per layer) |
| mxfp4              | uint8 codes [N, K/2]  | uint8 E8M0 [N, K/32]           | 4.25              |
| mxfp4_ocp          | as mxfp4, OCP FLOOR scale rounding, ties-to-even elements         | 4.25 |
Aliases: "fp8" -> fp8_e4m3fn, "fp8_fnuz" -> fp8_e4m3fnuz, "mxfp4_even"/"mxfp4_aiter" -> mxfp4.
"""

from . import fp8, mxfp4  # each registers its formats on import
from .base import (
    ALIASES,
    FORMATS,
    QuantizedWeight,
    WeightFormat,
    get_format,
    quantize_weight,
    register_format,
)
from .fp8 import Fp8Format
from .mxfp4 import Mxfp4Format

__all__ = [
    "ALIASES",
    "FORMATS",
    "Fp8Format",
    "Mxfp4Format",
    "QuantizedWeight",
    "WeightFormat",
    "fp8",
    "get_format",
    "mxfp4",
    "quantize_weight",
    "register_format",
]
