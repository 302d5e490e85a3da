"""The AITER seam (quant/amd.py), tested against an emulation of AITER's documented layouts:
no AMD GPU here. Layout facts checked: shuffle_weight's 16x16 tiles, e8m0_shuffle's padding to
[ceil256(M), ceil8(K/32)] and its permutation, padding to N % 16 == 0 and K % 64 == 0, bias added
after the bf16 GEMM, and that PyPI's unrelated `aiter` is refused."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from quant.formats import get_format
from quant.matmul.backends import aiter as amd
from quant.matmul.reference import reference_linear
from quant.matmul.registry import DeviceInfo, _choose


def test_shuffle_weight_layout_and_inverse():
    n, kb = 32, 64
    codes = torch.arange(n * kb, dtype=torch.int32).remainder(251).to(torch.uint8).view(n, kb)
    sh = amd.shuffle_weight(codes)
    # AITER layout: tile (n0, k0) of 16 rows x 32 bytes is stored as 2 halves of [16 rows x 16 bytes]
    tile = sh.view(-1)[: 16 * 32].view(2, 16, 16)  # first tile: half, row, byte
    assert torch.equal(tile[0], codes[:16, :16]) and torch.equal(tile[1], codes[:16, 16:32])
    nxt = sh.view(-1)[16 * 32 : 2 * 16 * 32].view(2, 16, 16)  # next tile along K, same rows
    assert torch.equal(nxt[0], codes[:16, 32:48])
    assert torch.equal(amd.unshuffle_weight(sh), codes)
    with pytest.raises(ValueError, match="N % 16"):
        amd.shuffle_weight(codes[:20])


def test_e8m0_shuffle_padding_and_inverse():
    m, s = 40, 6
    scales = torch.randint(100, 140, (m, s), dtype=torch.uint8)
    sh = amd.e8m0_shuffle(scales)
    assert sh.shape == (256, 8)
    assert torch.equal(amd.e8m0_unshuffle(sh, m, s), scales)
    full = amd.e8m0_unshuffle(sh, 256, 8)
    assert (full[m:] == amd.E8M0_ONE).all() and (full[:, s:] == amd.E8M0_ONE).all()
    # AITER's index formula (its quant kernel's SHUFFLE branch) for one element
    i, j = 37, 5
    off = (
        (i % 32 // 16) + (j % 8 // 4) * 2 + (i % 16) * 4 + (j % 4) * 64 + (j // 8) * 256 + (i // 32) * 32 * 8
    )
    assert sh.view(-1)[off] == scales[i, j]


@pytest.mark.parametrize("m,k,n,bias", [(37, 192, 40, True), (5, 64, 16, False), (300, 320, 48, True)])
def test_aiter_linear_with_emulated_aiter(m, k, n, bias):
    """Padding (N to 16, K to 64), quant, shuffles and gemm give the pack's own w4a4 result."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    qw = get_format("mxfp4").quantize(torch.randn(n, k, generator=g) * 0.02)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    y = amd.aiter_linear(x, qw, b, ops=amd.EmulatedAiter)
    yr = reference_linear(x, qw, b, "w4a4")
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), yr.float(), rtol=1e-2, atol=2e-2)


def test_prepare_weight_pads_and_caches():
    qw = get_format("mxfp4").quantize(torch.randn(40, 96))
    pw = amd.prepare_weight(qw, amd.EmulatedAiter)
    assert (pw.n, pw.k, pw.n_pad, pw.k_pad) == (40, 96, 48, 128)
    assert pw.codes.shape == (48, 64) and pw.scales.shape == (256, 8)
    assert amd.prepare_weight(qw, amd.EmulatedAiter) is pw
    codes = amd.unshuffle_weight(pw.codes)
    assert torch.equal(codes[:40, :48], qw.qdata) and (codes[40:] == 0).all() and (codes[:, 48:] == 0).all()


def test_dynamic_quant_emulation_matches_pack_format():
    x = torch.randn(20, 64)
    codes, scales = amd.dynamic_mxfp4_quant_emulated(x, shuffle=False)
    c2, s2 = get_format("mxfp4").quantize(x).qdata, get_format("mxfp4").quantize(x).scale
    assert torch.equal(codes, c2) and torch.equal(scales[:20, :2], s2)
    assert scales.shape == (256, 8)


def test_backend_chosen_only_on_gfx950_with_real_aiter(monkeypatch):
    fmt = get_format("mxfp4")
    gfx950 = DeviceInfo("cuda", 0, "amd", (9, 5), "gfx950")
    monkeypatch.setattr(amd, "aiter_module", lambda: None)
    ok, why = amd._aiter_check(gfx950, fmt)
    assert not ok and "amd-aiter" in why
    assert _choose(fmt, gfx950, "w4a4", None).name == "reference"
    monkeypatch.setattr(amd, "aiter_module", lambda: amd.EmulatedAiter)
    assert _choose(fmt, gfx950, "w4a4", None).name == "aiter_a4w4"
    assert not amd._aiter_check(DeviceInfo("cuda", 0, "amd", (9, 4), "gfx942"), fmt)[0]
    assert not amd._aiter_check(DeviceInfo("cuda", 0, "nvidia", (9, 0), "sm_90"), fmt)[0]


def test_pypi_aiter_is_refused(monkeypatch):
    fake = types.ModuleType("aiter")  # PyPI's 'aiter' (async iterators) has no gemm_a4w4
    monkeypatch.setitem(sys.modules, "aiter", fake)
    amd.aiter_module.cache_clear()
    try:
        assert amd.aiter_module() is None
    finally:
        amd.aiter_module.cache_clear()
