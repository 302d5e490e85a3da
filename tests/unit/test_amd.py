"""The AITER seam (quant/matmul/backends/aiter.py), tested against a stub `aiter` whose functions
have the exact signatures of AITER tag v0.1.20.post1 (tests/support/aiter_stub.py): no AMD GPU
here. Checked: shuffle_weight's 16x16 tiles, e8m0_shuffle's padding to [ceil256(M), ceil8(K/32)]
and its permutation, padding to N % 16 == 0 and K % 64 == 0, bias added after the bf16 GEMM, the
calls going through AITER's real signatures (a wrong keyword fails), releases before v0.1.12 and
PyPI's unrelated `aiter` refused."""

from __future__ import annotations

import importlib
import inspect
import sys
import types

import aiter_stub
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


@pytest.fixture
def stub_aiter(monkeypatch):
    """The stub as `aiter` in sys.modules, found by the backend's own lazy import."""
    amd.aiter_status.cache_clear()
    mods = aiter_stub.install(monkeypatch)
    yield mods
    amd.aiter_status.cache_clear()


# Parameters (name, default or None for "required") as in AITER v0.1.20.post1's source; the
# stub must not drift from them, or a wrong keyword could pass here and fail on a real machine.
_REQ = inspect.Parameter.empty
AITER_SIGNATURES = {
    "gemm_a4w4": [
        ("A", _REQ), ("B", _REQ), ("A_scale", _REQ), ("B_scale", _REQ), ("bias", None),
        ("dtype", torch.bfloat16), ("alpha", 1.0), ("beta", 0.0), ("bpreshuffle", True),
        ("apreshuffle", False), ("global_A_scale", None), ("global_B_scale", None),
    ],
    "dynamic_mxfp4_quant": [("x", _REQ), ("scaling_mode", "even"), ("shuffle", False)],
    "e8m0_shuffle": [("scale", _REQ)],
    "shuffle_weight": [
        ("x", _REQ), ("layout", (16, 16)), ("use_int4", False), ("is_guinterleave", False),
        ("gate_up", False), ("pad_k_to", 0),
    ],
    "triton_dynamic_mxfp4_quant": [("x", _REQ), ("scaling_mode", "even")],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(AITER_SIGNATURES))
def test_stub_signatures_are_aiters(name):
    params = inspect.signature(getattr(aiter_stub, name)).parameters.values()
    got = [(p.name, p.default) for p in params]
    assert got == AITER_SIGNATURES[name]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


def test_the_triton_quant_takes_no_shuffle(stub_aiter):
    """aiter.ops.triton.quant.dynamic_mxfp4_quant is (x, scaling_mode) in every tag: a call with
    shuffle= raises, so the backend must use aiter.utility.fp4_utils.dynamic_mxfp4_quant."""
    x = torch.randn(4, 64)
    with pytest.raises(TypeError, match="shuffle"):
        importlib.import_module("aiter.ops.triton.quant").dynamic_mxfp4_quant(x, shuffle=True)
    ops = amd.aiter_module()
    assert (
        ops is not None
        and ops.dynamic_mxfp4_quant is stub_aiter["aiter.utility.fp4_utils"].dynamic_mxfp4_quant
    )


@pytest.mark.parametrize("m,k,n,bias", [(37, 192, 40, True), (5, 64, 16, False), (300, 320, 48, True)])
def test_aiter_linear_through_the_stub(stub_aiter, m, k, n, bias):
    """Found by the lazy import, called with AITER's signatures: padding (N to 16, K to 64),
    quant, shuffles and gemm give the pack's own w4a4 result."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    qw = get_format("mxfp4").quantize(torch.randn(n, k, generator=g) * 0.02)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    assert amd.aiter_module() is not None, amd.aiter_status()[1]
    y = amd.aiter_linear(x, qw, b)
    yr = reference_linear(x, qw, b, "w4a4")
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), yr.float(), rtol=1e-2, atol=2e-2)


def test_prepare_weight_pads_and_caches(stub_aiter):
    ops = amd.aiter_module()
    qw = get_format("mxfp4").quantize(torch.randn(40, 96))
    pw = amd.prepare_weight(qw, ops)
    assert (pw.n, pw.k, pw.n_pad, pw.k_pad) == (40, 96, 48, 128)
    assert pw.codes.shape == (48, 64) and pw.scales.shape == (256, 8)
    assert pw.codes.dtype == ops.fp4x2 and pw.scales.dtype == ops.fp8_e8m0  # AITER's dtypes
    assert amd.prepare_weight(qw, ops) is pw
    codes = amd.unshuffle_weight(pw.codes.view(torch.uint8))
    assert torch.equal(codes[:40, :48], qw.qdata) and (codes[40:] == 0).all() and (codes[:, 48:] == 0).all()


def test_activation_quant_is_the_pack_format(stub_aiter):
    """AITER v0.1.12+ quantizes activations exactly like the "mxfp4" format (rounding "even")."""
    x = torch.randn(20, 64)
    quant = importlib.import_module("aiter.utility.fp4_utils").dynamic_mxfp4_quant
    codes, scales = quant(x, shuffle=False)
    ref = get_format("mxfp4").quantize(x)
    assert torch.equal(codes.view(torch.uint8), ref.qdata) and torch.equal(
        scales.view(torch.uint8), ref.scale
    )
    _, shuffled = quant(x, shuffle=True)
    assert shuffled.shape == (256, 8)
    assert torch.equal(amd.e8m0_unshuffle(shuffled.view(torch.uint8), 20, 2), ref.scale)


def test_backend_chosen_only_on_gfx950_with_real_aiter(monkeypatch, stub_aiter):
    fmt = get_format("mxfp4")
    gfx950 = DeviceInfo("cuda", 0, "amd", (9, 5), "gfx950")
    monkeypatch.setattr(amd, "aiter_module", lambda: None)
    ok, why = amd._aiter_check(gfx950, fmt)
    assert not ok
    assert _choose(fmt, gfx950, "w4a4", None).name == "reference"
    monkeypatch.undo()
    aiter_stub.install(monkeypatch)
    amd.aiter_status.cache_clear()
    assert _choose(fmt, gfx950, "w4a4", None).name == "aiter_a4w4"
    assert not amd._aiter_check(gfx950, get_format("mxfp4_ocp"))[0]
    assert not amd._aiter_check(DeviceInfo("cuda", 0, "amd", (9, 4), "gfx942"), fmt)[0]
    assert not amd._aiter_check(DeviceInfo("cuda", 0, "nvidia", (9, 0), "sm_90"), fmt)[0]


def test_not_installed_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "aiter", None)  # import raises ImportError
    amd.aiter_status.cache_clear()
    try:
        ops, why = amd.aiter_status()
        assert ops is None and "amd-aiter is not installed" in why
        ok, reason = amd._aiter_check(DeviceInfo("cuda", 0, "amd", (9, 5), "gfx950"), get_format("mxfp4"))
        assert not ok and reason == why
    finally:
        amd.aiter_status.cache_clear()


VERSIONS = [
    ("0.1.11", False),
    ("0.1.8.post2", False),
    ("0.1.12", True),
    ("0.1.20.post1", True),
    ("0.1.21.dev46+ge4048607a", True),
]


@pytest.mark.parametrize("version,ok", VERSIONS)
def test_releases_before_0_1_12_refused(monkeypatch, stub_aiter, version, ok):
    monkeypatch.setattr(amd, "_installed_version", lambda: version)
    ops, why = amd.aiter_status()
    assert (ops is not None) == ok, why
    if not ok:
        assert "0.1.12" in why and "ties away" in why


def test_wrong_signature_refused(monkeypatch, stub_aiter):
    """An AITER whose fp4_utils quantizer took no `shuffle` would be refused, not called wrongly."""
    monkeypatch.setattr(
        stub_aiter["aiter.utility.fp4_utils"], "dynamic_mxfp4_quant", aiter_stub.triton_dynamic_mxfp4_quant
    )
    ops, why = amd.aiter_status()
    assert ops is None and "does not take shuffle" in why


def test_pypi_aiter_is_refused(monkeypatch):
    fake = types.ModuleType("aiter")  # PyPI's 'aiter' (async iterators) has no gemm_a4w4
    monkeypatch.setitem(sys.modules, "aiter", fake)
    amd.aiter_status.cache_clear()
    try:
        assert amd.aiter_module() is None
        assert "not AMD's amd-aiter" in amd.aiter_status()[1]
    finally:
        amd.aiter_status.cache_clear()
