"""MXFP4 "even" against a plain-PyTorch re-implementation of AMD AITER's MXFP4 quantizer.

The reference below is written from the steps of AITER's `dynamic_mxfp4_quant` kernel in
`aiter/utility/fp4_utils.py` (github.com/ROCm/aiter), read at tags v0.1.11, v0.1.12 and
v0.1.20.post1 and at main v0.1.20-46-ge4048607a5 (the file is unchanged from v0.1.20.post1 to that
commit). Per 32-element block, in fp32:
  scale:    amax = max|x|; amax's bits + 0x200000, masked with 0xFF800000; e = floor(log2(.)) - 2,
            clamped to [-127, 127]; scale byte e + 127; elements q = x * 2^-e (same in every tag).
  elements (v0.1.12 and later): |q| >= 6 saturates to code 7; |q| < 1 is rounded by adding 2^22
            in fp32 (the FPU's round-to-nearest-even picks 0, 0.5 or 1.0); otherwise the fp32
            bits are re-biased and rounded to one mantissa bit, ties to even. Sign kept for zero.
  elements (v0.1.11 and earlier): exponent/mantissa fields shifted into E2M1 position, then
            "+1, >> 1" on the kept bits: round to nearest, ties away from zero.
The only intended difference from the pack: a block whose amax is >= 1.75 * 2^127 (~2.98e38).
AITER writes scale byte 254 there and its codes dequantize to +-inf; the pack keeps the block
finite (byte 252, top elements saturated to +-6).
"""

from __future__ import annotations

import pytest
import torch

from quant.formats import mxfp4

_TOP = 1.75 * 2.0**127  # amax from which AITER's amax rounding carries into +inf


def _i32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


def _aiter_scale(blocks: torch.Tensor) -> torch.Tensor:
    """Float exponent e per block [R, B, 1] for fp32 blocks [R, B, 32]."""
    amax = blocks.abs().amax(-1, keepdim=True)
    rounded = ((amax.view(torch.int32) + 0x200000) & _i32(0xFF800000)).view(torch.float32)
    return (torch.log2(rounded).floor() - 2).clamp(-127, 127)


def _codes_head(q: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of fp32 q, AITER v0.1.12+ element rounding (ties to even)."""
    bits = q.view(torch.int32)
    sign = bits & _i32(0x80000000)
    mag = (bits ^ sign).view(torch.float32)
    saturate = mag >= 6.0
    small = ~saturate & (mag < 1.0)
    # below 1: fp32 addition of 2^22 leaves the value rounded to a multiple of 0.5 in the low bits
    small_code = (mag + 2.0**22).view(torch.int32) - (149 << 23)
    mb = mag.view(torch.int32)
    # 1 <= |q| < 6: bias 127 -> 1, then keep one mantissa bit with round-half-to-even
    normal_code = (mb + ((1 - 127) << 23) + (1 << 21) - 1 + ((mb >> 22) & 1)) >> 22
    code = torch.where(saturate, torch.full_like(mb, 7), torch.where(small, small_code, normal_code))
    return (code | ((sign >> 28) & 8)).to(torch.uint8)


def _codes_v0111(q: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of fp32 q, AITER <= v0.1.11 element rounding (ties away from zero). A shift by
    32 or more is taken as shifting every bit out."""
    bits = q.view(torch.int32)
    neg = bits < 0
    e = (bits >> 23) & 0xFF
    m = bits & 0x7FFFFF
    shift = (126 - e).clamp(0, 31)
    m = torch.where(e < 127, (0x400000 | (m >> 1)) >> shift, m)
    e2 = e.clamp(min=126) - 126
    code = ((((e2 << 2) | (m >> 21)) + 1) >> 1).clamp(max=7)
    return (code | (neg.to(torch.int32) << 3)).to(torch.uint8)


def aiter_reference(x: torch.Tensor, release: str = "head") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [R, K/2] even element in the low nibble, scale bytes uint8 [R, K/32])."""
    r, k = x.shape
    blocks = x.float().reshape(r, k // 32, 32)
    e = _aiter_scale(blocks)
    q = (blocks * torch.exp2(-e)).reshape(r, k)
    codes = _codes_head(q) if release == "head" else _codes_v0111(q)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, (e.squeeze(-1).to(torch.int32) + 127).to(torch.uint8)


def _compare(x: torch.Tensor, rounding: str = "even", release: str = "head") -> dict[str, int]:
    """Pack vs reference, block by block. Blocks below _TOP must agree bit for bit (scale byte
    and all 16 code bytes); blocks at or above it must differ exactly as documented."""
    r, k = x.shape
    codes, scales = mxfp4.quantize(x, rounding)
    ref_codes, ref_scales = aiter_reference(x, release)
    same = (codes.view(r, k // 32, 16) == ref_codes.view(r, k // 32, 16)).all(-1) & (scales == ref_scales)
    top = x.float().abs().reshape(r, k // 32, 32).amax(-1) >= _TOP
    bad = ~same & ~top
    assert not bad.any(), (
        f"{int(bad.sum())} blocks differ, first: {x.float().reshape(r, k // 32, 32)[bad][0].tolist()}"
    )
    if top.any():  # AITER: byte 254, +-inf after decoding; the pack: byte 252, finite
        assert (ref_scales[top] == 254).all() and (scales[top] == 252).all()
        assert mxfp4.dequantize(ref_codes, ref_scales, torch.float32).isinf().any()
        assert torch.isfinite(mxfp4.dequantize(codes, scales, torch.float32)).all()
    return {"blocks": same.numel(), "bit_exact": int(same.sum()), "top_blocks": int(top.sum())}


def test_reference_on_the_known_tie_block():
    x = torch.tensor([[4, 5, 2.5, 0.25, 1.25, 3.5, 0.75, 1.75] + [0.0] * 24], dtype=torch.bfloat16)
    for release, expected in (("head", [4, 4, 2, 0, 1, 4, 1, 2]), ("v0.1.11", [4, 6, 3, 0.5, 1.5, 4, 1, 2])):
        codes, scales = aiter_reference(x, release)
        assert scales.tolist() == [[127]]
        assert mxfp4.dequantize(codes, scales, torch.float32)[0, :8].tolist() == expected


# Every E2M1 midpoint and grid point, both signs, at block exponents over the whole E8M0 range.
_POINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.0, 0.125, 5.5)
_EXPONENTS = {
    torch.float32: (-127, -126, -120, -60, -3, 0, 1, 7, 60, 120, 125),
    torch.bfloat16: (-127, -126, -120, -60, -3, 0, 1, 7, 60, 120, 125),
    torch.float16: (-24, -14, -3, 0, 1, 7, 13),
}


def _tie_blocks(dtype: torch.dtype) -> torch.Tensor:
    pts = torch.tensor(_POINTS, dtype=torch.float64)
    rows = []
    for e in _EXPONENTS[dtype]:
        # 6 * 2^e as amax fixes the block exponent at e (mantissa 1.5: no carry, no saturation)
        row = torch.cat([torch.tensor([6.0]), pts, -pts[:15]]) * 2.0**e
        rows += [row, row.flip(0), -row]
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ties_bit_exact(dtype):
    x = _tie_blocks(dtype)
    assert torch.isfinite(x).all()
    stats = _compare(x)
    assert stats["bit_exact"] == stats["blocks"]
    # and the older rounding, against the older release's element rule
    _compare(x, "even_ties_away", "v0.1.11")
    # the two releases really differ on these blocks (else the test proves nothing)
    assert not torch.equal(aiter_reference(x)[0], aiter_reference(x, "v0.1.11")[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_bit_exact(dtype):
    g = torch.Generator().manual_seed(7)
    rows, k = 256, 1024
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    lo, hi = (-20, 10) if dtype == torch.float16 else (-120, 120)
    block_exp = torch.randint(lo, hi, (rows, k // 32, 1), generator=g).to(torch.float64)
    x = (x.view(rows, k // 32, 32) * torch.exp2(block_exp)).view(rows, k).to(dtype)
    assert torch.isfinite(x).all()
    stats = _compare(x)
    assert stats["bit_exact"] == stats["blocks"] == rows * k // 32
    _compare(x, "even_ties_away", "v0.1.11")


def test_random_fp32_bit_patterns():
    """Any finite fp32: all exponents, subnormals, and blocks above 1.75 * 2^127."""
    g = torch.Generator().manual_seed(11)
    bits = torch.randint(-(2**31), 2**31 - 1, (512, 1024), generator=g, dtype=torch.int32)
    x = bits.view(torch.float32)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    stats = _compare(x)
    assert stats["top_blocks"] > 0  # the documented difference is exercised
    assert stats["bit_exact"] == stats["blocks"] - stats["top_blocks"]
    _compare(x, "even_ties_away", "v0.1.11")


def _edge_blocks() -> list[tuple[torch.dtype, list[float]]]:
    f32max = torch.finfo(torch.float32).max
    bf16max = torch.finfo(torch.bfloat16).max
    sub32 = [2.0**-149, 2.0**-140, 3 * 2.0**-130, 2.0**-127, 1.5 * 2.0**-127]
    return [
        (torch.float32, [0.0] * 32),
        (torch.float32, [-0.0] * 32),
        (torch.float32, [-0.0, 0.0] * 16),
        (torch.float32, sub32 + [-v for v in sub32] + [0.0] * 22),
        (torch.float32, [2.0**-126] + sub32 + [0.0] * 26),
        (torch.float32, [1.75 * 2.0**-127, -(2.0**-149)] + [0.0] * 30),
        (torch.float32, [2.0**-149] * 32),
        (torch.float32, [1.0, 1e-30, -1e-38, 2.0**-149, 3.0, -5.9] + [0.0] * 26),
        (torch.float32, [1.75 * 2.0**126, -(2.0**126), 2.0**100] + [1.0] * 29),
        (torch.float32, [2.0**127, -(1.5 * 2.0**127), 1e38] + [-1.0] * 29),
        (torch.float32, [1.7499999 * 2.0**127, 1.0] + [0.0] * 30),  # just below the carry
        (torch.float32, [_TOP, 1e38, -3e37] + [0.0] * 29),  # from here AITER overflows
        (torch.float32, [f32max, -f32max, 1.0, 2.0**-149] + [0.0] * 28),
        (torch.bfloat16, [bf16max, -3.0e38, 2.99e38, 1.0] + [0.0] * 28),
        (torch.bfloat16, [2.0**-133, -(2.0**-126), 2.0**-130] + [0.0] * 29),  # bf16 subnormals
        (torch.bfloat16, [1.7e38, -(2.0**127)] + [1e37] * 30),
        (torch.float16, [65504.0, -65504.0, 2.0**-24, -(2.0**-24), 6.1e-5] + [0.0] * 27),
        (torch.float16, [2.0**-24, 2.0**-20, 3 * 2.0**-24] + [0.0] * 29),  # fp16 subnormals
        (torch.float16, [0.0] * 31 + [-0.0]),
    ]


@pytest.mark.parametrize("dtype,vals", _edge_blocks())
def test_edge_blocks_bit_exact(dtype, vals):
    x = torch.tensor([vals], dtype=torch.float64).to(dtype)
    assert torch.isfinite(x).all()
    stats = _compare(x)
    if x.float().abs().max() < _TOP:
        assert stats["bit_exact"] == 1
    _compare(x, "even_ties_away", "v0.1.11")
