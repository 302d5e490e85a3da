"""MXFP4 "floor" and "ceil" (and "even" in its ordinary range) against torchao's `to_mx`.

Skipped without torchao, which is not a dependency. Checked with torchao 0.18.0. Where the
modes are compared: torchao FLOOR = OCP MX v1.0 §6.3 = "floor"; RCEIL (ceil(log2(amax / 6)),
the cuBLAS / NVIDIA rule) = "ceil"; EVEN (amax rounded at its top mantissa bit, the rule AITER
also uses) = "even". All round elements to nearest, ties to even. Blocks are kept away from the
ends of the E8M0 range, where torchao deliberately differs: it divides by 2^-126 instead of
2^-127 for scale byte 0 (FLOOR/EVEN) or does not scale at all (RCEIL); and above 1.5 * 2^127
(RCEIL) or from 1.75 * 2^127 (EVEN) it picks the scale 2^126, with which an amax from
1.75 * 2^127 dequantizes to +-inf, where the pack caps the exponent at 125 and stays finite.
"""

from __future__ import annotations

import pytest
import torch

from quant.formats import mxfp4

mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
ScaleCalculationMode = pytest.importorskip("torchao.prototype.mx_formats.config").ScaleCalculationMode

MODES = {"floor": "FLOOR", "ceil": "RCEIL", "even": "EVEN"}


def _blocks(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    rows, k = 128, 512
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    block_exp = torch.randint(-100, 100, (rows, k // 32, 1), generator=g).to(torch.float64)
    x = x.view(rows, k // 32, 32) * torch.exp2(block_exp)
    # exact E2M1 ties and amax mantissas at the 1.5 / 1.75 boundaries in a quarter of the blocks
    pts = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 1.5 * 4, 1.75 * 4])
    pick = pts[torch.randint(0, len(pts), (rows, k // 32, 32), generator=g)].double()
    sign = torch.where(torch.rand(rows, k // 32, 32, generator=g) < 0.5, -1.0, 1.0).double()
    ties = pick * sign * torch.exp2(block_exp)
    use = torch.rand(rows, k // 32, 1, generator=g) < 0.25
    return torch.where(use, ties, x).view(rows, k).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rounding", sorted(MODES))
def test_matches_torchao_to_mx(rounding, dtype):
    x = _blocks(dtype)
    mode = getattr(ScaleCalculationMode, MODES[rounding])
    scale, data = mx_tensor.to_mx(x, torch.float4_e2m1fn_x2, 32, mode)
    codes, scales = mxfp4.quantize(x, rounding)
    assert torch.equal(scales, scale.view(torch.uint8))
    assert torch.equal(codes, data.view(torch.uint8))  # both: even element in the low nibble
