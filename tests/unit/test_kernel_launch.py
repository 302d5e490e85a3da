"""Cached Triton launches (quant/kernels/launch.py): the key separates every specialization
Triton makes, the direct launcher call passes every parameter in signature order, and on a GPU
the cached launch gives the ordinary launch's bits."""

from __future__ import annotations

import types

import pytest
import torch

from quant.kernels import launch as L


@pytest.fixture(autouse=True)
def _cache_on(monkeypatch):
    """The cache, on unless ONLINEQUANT_TRITON_LAUNCH_CACHE=0; these tests are about it."""
    monkeypatch.setattr(L, "CACHE_ENABLED", True)


def _key(*args, **constexprs):
    return L.launch_key(args, constexprs, 0)


def test_the_key_separates_what_triton_specializes_on():
    a = torch.zeros(64, dtype=torch.bfloat16)
    assert _key(a, 3) == _key(torch.ones(64, dtype=torch.bfloat16), 5)  # values alone: same kernel
    assert _key(a, 3) != _key(a.float(), 3)  # dtype
    assert _key(a, 3) != _key(a[1:], 3)  # 16-byte alignment of the pointer
    assert _key(a, 3) != _key(a, 1)  # ints equal to 1 become constants
    assert _key(a, 3) != _key(a, 32)  # ints divisible by 16
    assert _key(a, 3) != _key(a, 2**33 + 3)  # i32 vs i64
    assert _key(a, 3) != _key(a, True)  # bool is i1, not an int
    assert _key(a, 3) != _key(a, -3)  # sign (u64 vs i64 for the largest ints)
    assert _key(a, 16) != _key(a, 16.0)  # floats are their own type
    assert _key(a, 3, BLOCK=64) != _key(a, 3, BLOCK=128)  # constexprs
    assert _key(a, 3, num_warps=4) != _key(a, 3, num_warps=8)  # launch options
    assert L.launch_key((a,), {}, 0) != L.launch_key((a,), {}, 1)  # device


class _FakeCompiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


class _FakeKernel:
    """A real JITFunction's parameters; launching records instead of compiling."""

    def __init__(self, real):
        from triton.runtime.jit import JITFunction

        fn = getattr(real, "fn", real)  # under TRITON_INTERPRET=1 `real` is an InterpretedFunction
        self.params, self.fn, self.compiled, self.ordinary = JITFunction(fn).params, fn, _FakeCompiled(), 0

    def __getitem__(self, grid):
        def go(*args, **kw):
            self.ordinary += 1
            return self.compiled

        return go


@pytest.fixture
def fake_kernel(monkeypatch):
    """A recording stand-in for the FP8 dequantization kernel, launched as on a GPU (Triton 3.4+
    runtime without hooks, device 0, stream 1234) with an empty launch cache."""
    pytest.importorskip("triton")
    from quant.kernels._tl_fp8_dequant import fp8_dequant_kernel

    plain = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    monkeypatch.setattr(L, "_runtime", lambda: plain)
    monkeypatch.setattr(L, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda d: 1234, raising=False)
    L.clear_cache()
    yield _FakeKernel(fp8_dequant_kernel)
    L.clear_cache()


def test_the_direct_call_passes_every_parameter_in_signature_order(fake_kernel):
    k = fake_kernel
    q, s, out = torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4), torch.empty(4, 32)
    # constexprs in another order than the signature's, plus a launch option that is no parameter
    cx = {"BLOCK_K": 64, "num_warps": 4, "EMULATE_BF16": False, "BLOCK_N": 16, "PER_ROW": True}
    L.launch(k, (3, 2), (q, s, out, 4, 32, 32, 32), cx)
    assert k.ordinary == 1 and not k.compiled.calls  # first call: Triton's own path (compiles)
    L.launch(k, (3, 2), (q, s, out, 4, 32, 32, 32), cx)
    assert k.ordinary == 1 and len(k.compiled.calls) == 1
    call = k.compiled.calls[0]
    assert call[:9] == (3, 2, 1, 1234, "fn", "meta", None, None, None)
    # the 7 runtime arguments, then the constexpr parameters in the kernel's signature order
    assert call[9:16] == (q, s, out, 4, 32, 32, 32) and call[16:] == (True, False, 16, 64)
    L.launch(k, (3, 2), (q, s, out, 1, 32, 32, 32), cx)  # N = 1: another specialization
    assert k.ordinary == 2


def test_a_launcher_that_refuses_the_arguments_falls_back_to_tritons_launch(fake_kernel, caplog):
    k = fake_kernel

    def refuse(*a):
        raise TypeError("function takes exactly 20 arguments")

    k.compiled.run = refuse
    args = (None, None, None, 4, 32, 32, 32)
    cx = {"PER_ROW": True, "EMULATE_BF16": False, "BLOCK_N": 16, "BLOCK_K": 64}
    for _ in range(4):
        L.launch(k, (1,), args, cx)
    # first: Triton's launch (compiles); second: the direct call fails, Triton's launch instead;
    # after that Triton's launch every time, and the failure is said once
    assert k.ordinary == 4
    assert sum("cached Triton launch" in r.message for r in caplog.records) == 1


def test_the_cache_is_on_unless_turned_off(monkeypatch):
    import importlib

    monkeypatch.delenv("ONLINEQUANT_TRITON_LAUNCH_CACHE", raising=False)
    assert importlib.reload(L).CACHE_ENABLED is True
    for value, on in (("0", False), ("1", True), ("", True)):
        monkeypatch.setenv("ONLINEQUANT_TRITON_LAUNCH_CACHE", value)
        assert importlib.reload(L).CACHE_ENABLED is on
    monkeypatch.undo()  # the environment as it was, and the module read from it again
    importlib.reload(L)


def test_an_empty_hook_chain_is_no_hook():
    """Triton 3.6 keeps an empty HookChain where 3.4/3.5 keep None: neither is a hook, and the
    cached path must not be switched off (nor call an empty chain) because of it."""
    chain = types.SimpleNamespace(calls=[])
    assert not L._hook_set(None) and not L._hook_set(chain)
    chain.calls.append(lambda *a: None)
    assert L._hook_set(chain) and L._hook_set(lambda *a: None)


def test_a_launch_hook_or_the_interpreter_takes_the_ordinary_path(monkeypatch):
    pytest.importorskip("triton")
    from quant.kernels._tl_fp8_dequant import fp8_dequant_kernel

    hooked = types.SimpleNamespace(launch_enter_hook=lambda *a: None, launch_exit_hook=None)
    monkeypatch.setattr(L, "_runtime", lambda: hooked)
    monkeypatch.setattr(L, "interpreting", lambda: False)
    k = _FakeKernel(fp8_dequant_kernel)
    for _ in range(3):
        L.launch(k, (1,), (None,) * 7, {"PER_ROW": True, "EMULATE_BF16": False, "BLOCK_N": 16, "BLOCK_K": 64})
    assert k.ordinary == 3 and not k.compiled.calls and not L._COMPILED


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the direct launcher call needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 3, 16, 200])
def test_cached_launches_give_the_ordinary_launchs_bits_on_a_gpu(m):
    from quant.kernels.fp8_dequant import fp8_dequantize, fp8_dequantize_reference
    from quant.kernels.fp8_quant import quantize_fp8_per_token, quantize_fp8_per_token_reference

    L.clear_cache()
    for seed in range(3):  # the first call per key compiles; the next ones launch directly
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = (torch.randn(m, 320, generator=g, device="cuda") * (seed + 1)).to(torch.bfloat16)
        q, s = quantize_fp8_per_token(x)
        qr, sr = quantize_fp8_per_token_reference(x)
        assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
        w = fp8_dequantize(qr, sr)
        assert torch.equal(w, fp8_dequantize_reference(qr, sr))
    if L._runtime() is not None:
        assert L._COMPILED, "the cached path was never taken"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the direct launcher call needs a CUDA GPU")
def test_cached_gemm_launches_match_the_first_launch_and_the_reference_on_a_gpu():
    from quant.formats import get_format
    from quant.kernels import fp8_dequant, mxfp4_gemm

    L.clear_cache()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(96, 256, generator=g, device="cuda") * 0.05
    q8, q4 = get_format("fp8_e4m3fn").quantize(w), get_format("mxfp4").quantize(w)
    pairs = [
        (fp8_dequant.fp8_linear_w8a16_fused, fp8_dequant.fp8_linear_w8a16_fused_reference, q8),
        (mxfp4_gemm.mxfp4_linear_w4a16, mxfp4_gemm.mxfp4_linear_w4a16_reference, q4),
    ]
    for fn, ref, qw in pairs:
        for m in (3, 5, 7):  # one key class: the first launch compiles, the next two are direct
            x = torch.randn(m, 256, generator=g, device="cuda").to(torch.bfloat16)
            first, again = fn(x, qw.qdata, qw.scale), fn(x, qw.qdata, qw.scale)
            assert torch.equal(first, again), fn.__name__
            expect = ref(x, qw.qdata, qw.scale).float()
            assert (first.float() - expect).norm() <= 1e-2 * expect.norm(), (fn.__name__, m)
    if L._runtime() is not None:
        assert L._COMPILED, "the cached path was never taken"
