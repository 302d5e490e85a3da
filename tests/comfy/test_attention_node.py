"""The attention backend node: override wiring on a clone, both layouts (Z-Image [B,H,L,D] with
skip_reshape, Wan [B,L,H*D]) against SDPA, fallbacks with one warning per model, clear errors
for backends that are not installed, `auto` resolution. flash-attn is not installed here: its
dispatch (layout transposes, tuple returns) is exercised through a stand-in module that computes
with SDPA, registered in sys.modules for the test only; `cudnn_fp8` through a fake cudnn module
(tests/support/fake_cudnn.py) passed through the backend's seam."""

from __future__ import annotations

import dataclasses
import logging
import sys
import types

import fake_cudnn
import helpers_models as hm
import pytest
import torch

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def A(pack):
    hm.import_submodules(pack, "nodes.attention", "nodes.loader", "quant.errors")
    return pack.nodes.attention


def _sdpa_bhld(q, k, v, mask=None):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _qkv(layout: str, dtype=torch.float32, b=2, h=3, length=10, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g).to(dtype) for _ in range(3))
    if layout == "bhld":
        return (q, k, v), (q, k, v)
    flat = [t.transpose(1, 2).reshape(b, length, h * d) for t in (q, k, v)]
    return flat, (q, k, v)


def _comfy_attention():
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch


def test_sdpa_override_matches_on_both_layouts(A):
    func = _comfy_attention()
    ov = A.AttentionOverride("sdpa")
    # Wan layout
    (q, k, v), bh = _qkv("blhd")
    out = ov(func, q, k, v, heads=3, transformer_options={}, _inside_attn_wrapper=True)
    ref = _sdpa_bhld(*bh).transpose(1, 2).reshape(2, 10, 3 * 64)
    assert out.shape == (2, 10, 192) and torch.allclose(out, ref, atol=1e-5)
    # Z-Image layout, mask passed positionally as Lumina does
    (q, k, v), bh = _qkv("bhld")
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 7:] = False
    out = ov(func, q, k, v, 3, mask[:, None, :], skip_reshape=True, transformer_options={})
    ref = _sdpa_bhld(*bh, mask=mask[:, None, None, :]).transpose(1, 2).reshape(2, 10, 192)
    assert torch.allclose(out, ref, atol=1e-5)
    out = ov(func, q, k, v, 3, skip_reshape=True, skip_output_reshape=True)
    assert out.shape == (2, 3, 10, 64) and torch.allclose(out, _sdpa_bhld(*bh), atol=1e-5)


@pytest.fixture
def fake_flash(monkeypatch):
    """A stand-in `flash_attn` ([B,L,H,D] in and out) that records its calls."""
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, causal=False):
        calls.append((tuple(q.shape), q.dtype))
        o = _sdpa_bhld(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    return calls


def test_flash_dispatch_layouts_and_fallbacks_warn_once(A, fake_flash, monkeypatch, caplog):
    # our stand-in runs on CPU: only the device rule is relaxed, the others stay
    backend = A.ATTENTION_BACKENDS["flash_attn_2"]

    def cpu_ok(q, k, v, mask):
        reason = A._flash_unsupported(q, k, v, mask)
        return None if reason and "needs a GPU" in reason else reason

    monkeypatch.setitem(
        A.ATTENTION_BACKENDS, "flash_attn_2", dataclasses.replace(backend, unsupported=cpu_ok)
    )
    func_calls = []
    comfy_func = _comfy_attention()

    def func(*args, **kwargs):
        func_calls.append(kwargs)
        return comfy_func(*args, **kwargs)

    ov = A.AttentionOverride("flash_attn_2", "TestModel")
    for layout in ("blhd", "bhld"):
        (q, k, v), bh = _qkv(layout, torch.bfloat16)
        out = ov(func, q, k, v, heads=3, skip_reshape=layout == "bhld", transformer_options={"x": 1})
        ref = _sdpa_bhld(*bh).transpose(1, 2).reshape(2, 10, 192)
        assert hm.rel_err(ref, out) < 1e-2
    assert len(fake_flash) == 2 and all(s == (2, 10, 3, 64) for s, _ in fake_flash) and not func_calls

    caplog.set_level(logging.WARNING)
    (q, k, v), _ = _qkv("blhd", torch.float32)  # fp32: flash-attn cannot take it
    for _ in range(3):
        ov(func, q, k, v, heads=3, transformer_options={"x": 1}, _inside_attn_wrapper=True)
    (q, k, v), _ = _qkv("bhld", torch.bfloat16, d=320)  # head dim > 256
    ov(func, q, k, v, heads=3, skip_reshape=True)
    assert len(fake_flash) == 2 and len(func_calls) == 4
    # kwargs reach ComfyUI's function unchanged (the wrapper flag included: no recursion)
    assert func_calls[0] == {"heads": 3, "transformer_options": {"x": 1}, "_inside_attn_wrapper": True}
    warnings = [r.getMessage() for r in caplog.records if "OnlineQuant attention" in r.getMessage()]
    assert len(warnings) == 2 and "float32" in warnings[0] and "head dim 320" in warnings[1]


def test_node_clones_model_and_errors_name_the_package(A, pack, tmp_path, monkeypatch):
    path = hm.save_model(hm.wan_model(seed=7), tmp_path / "wan.safetensors")
    mp, _ = pack.nodes.loader.load_quantized(str(path), "fp8_e4m3fn", None, compute_dtype="bf16")
    y0 = hm.run_diffusion_model(mp, hm.wan_inputs())
    m2, name, _ = A.apply_attention_backend(mp, "sdpa")
    assert m2 is not mp and "optimized_attention_override" not in mp.model_options.get(
        "transformer_options", {}
    )
    assert isinstance(
        m2.model_options["transformer_options"]["optimized_attention_override"], A.AttentionOverride
    )
    y1 = hm.run_diffusion_model(m2, hm.wan_inputs())
    assert hm.rel_err(y0, y1) < 1e-2  # same maths, another kernel
    m3, name, _ = A.apply_attention_backend(m2, "comfy_default")
    assert "optimized_attention_override" not in m3.model_options["transformer_options"]
    assert "optimized_attention_override" in m2.model_options["transformer_options"]

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn -> ImportError
    with pytest.raises(pack.quant.errors.BackendUnavailableError, match="flash-attn"):
        A.apply_attention_backend(mp, "flash_attn_2")
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    with pytest.raises(pack.quant.errors.BackendUnavailableError, match="flash_attn_interface"):
        A.apply_attention_backend(mp, "flash_attn_3")
    if not torch.cuda.is_available():
        with pytest.raises(pack.quant.errors.BackendUnavailableError, match="NVIDIA"):
            A.apply_attention_backend(mp, "sdpa_cudnn")


def test_auto_resolution(A, monkeypatch, fake_flash):
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    assert A.resolve_auto()[0] == "flash_attn_2"
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert A.resolve_auto()[0] != "flash_attn_2"
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert A.resolve_auto()[0] == "sdpa"


def test_registry_takes_a_new_backend(A, monkeypatch):
    monkeypatch.setattr(A, "ATTENTION_BACKENDS", dict(A.ATTENTION_BACKENDS))
    seen = []

    def run(q, k, v):
        seen.append(q.shape)
        return _sdpa_bhld(q, k, v)

    A.register_attention_backend(
        A.AttentionBackend("toy", "test", lambda: None, lambda q, k, v, m: None, run)
    )
    assert "toy" in A.backend_choices()
    (q, k, v), bh = _qkv("blhd")
    out = A.AttentionOverride("toy")(_comfy_attention(), q, k, v, heads=3)
    assert seen and torch.allclose(out, _sdpa_bhld(*bh).transpose(1, 2).reshape(2, 10, 192), atol=1e-5)


@pytest.fixture
def C(pack):
    hm.import_submodules(pack, "quant.attention.cudnn_fp8")
    return pack.quant.attention.cudnn_fp8


@pytest.fixture
def fake_cudnn_module(C):
    m = fake_cudnn.make()
    C.set_cudnn_module(m)
    yield m
    C.set_cudnn_module(None)


def _as_nvidia(monkeypatch, cap):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)


def test_cudnn_fp8_is_offered_but_auto_never_picks_it(A, monkeypatch, fake_cudnn_module):
    assert "cudnn_fp8" in A.backend_choices()
    desc = A.ATTENTION_BACKENDS["cudnn_fp8"].description
    assert "experimental" in desc and "error" in desc  # the user is told what error to expect
    for cap in ((8, 9), (9, 0), (10, 0), (12, 0)):
        _as_nvidia(monkeypatch, cap)
        assert (A.ATTENTION_BACKENDS["cudnn_fp8"].available() is None) == (cap >= (9, 0))
        assert A.resolve_auto()[0] != "cudnn_fp8"


class _StubModel:
    def __init__(self):
        self.model_options: dict = {}
        self.model = types.SimpleNamespace()

    def clone(self):
        return _StubModel()


def test_cudnn_fp8_without_the_package_names_it(A, C, pack, monkeypatch):
    C.set_cudnn_module(None)
    monkeypatch.setitem(sys.modules, "cudnn", None)  # import cudnn -> ImportError
    _as_nvidia(monkeypatch, (9, 0))
    with pytest.raises(pack.quant.errors.BackendUnavailableError, match="nvidia-cudnn-frontend"):
        A.apply_attention_backend(_StubModel(), "cudnn_fp8")


def test_cudnn_fp8_through_the_override_on_the_wan_layout(A, C, monkeypatch, fake_cudnn_module, caplog):
    func = _comfy_attention()
    (q, k, v), bh = _qkv("blhd", dtype=torch.bfloat16, length=16, d=64)
    # on CPU the registered backend falls back to ComfyUI's attention, with one warning
    with caplog.at_level(logging.WARNING):
        out = A.AttentionOverride("cudnn_fp8")(func, q, k, v, heads=3)
    assert torch.equal(out, func(q, k, v, heads=3)) and "cudnn_fp8 needs an NVIDIA GPU" in caplog.text
    assert not fake_cudnn_module.graphs
    # the fake runs on CPU: only the device rule is relaxed, the others stay
    monkeypatch.setattr(A, "ATTENTION_BACKENDS", dict(A.ATTENTION_BACKENDS))
    A.register_attention_backend(
        dataclasses.replace(A.ATTENTION_BACKENDS["cudnn_fp8"], unsupported=C.unsupported_reason)
    )
    out = A.AttentionOverride("cudnn_fp8")(func, q, k, v, heads=3)
    ref = _sdpa_bhld(*(t.float() for t in bh)).transpose(1, 2).reshape(2, 16, 3 * 64)
    assert out.shape == (2, 16, 192) and hm.rel_err(ref, out.float()) < 0.08
    (g,) = fake_cudnn_module.graphs
    assert {t.name: t.stride for t in g.tensors}["q"] == [16 * 192, 64, 192, 1]  # q's own strides
