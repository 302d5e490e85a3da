"""load_quantized on tiny Wan and Z-Image files built with ComfyUI's own classes (random weights,
real key names): plan, output error against the unquantized load, memory accounting, report,
failure handling."""

from __future__ import annotations

import gc
import weakref

import helpers_models as hm
import pytest
import torch

from quant.selection.user_text import AUTO_IGNORE_TEXT

pytestmark = pytest.mark.comfyui

FORMATS = ["fp8_e4m3fn", "fp8_e4m3fnuz", "mxfp4"]
# Output error bounds (relative L2 vs the bf16 load) for a 2-block random model: a broken
# quantizer or a wrong scale gives O(1) errors; these leave ~3x headroom over measured values.
MAX_ERR = {"fp8_e4m3fn": 0.05, "fp8_e4m3fnuz": 0.08, "mxfp4": 0.2}


@pytest.fixture(scope="module")
def wan_file(comfyui_path, tmp_path_factory):
    return hm.save_model(hm.wan_model(seed=0), tmp_path_factory.mktemp("wan") / "wan_tiny.safetensors")


@pytest.fixture(scope="module")
def zimage_file(comfyui_path, tmp_path_factory):
    return hm.save_model(hm.zimage_model(seed=0), tmp_path_factory.mktemp("zi") / "zimage_tiny.safetensors")


@pytest.fixture(scope="module")
def loader(pack):
    hm.import_submodules(pack, "nodes.loader", "nodes.layouts", "nodes.ops", "quant.errors", "quant.formats")
    return pack.nodes.loader


@pytest.fixture(scope="module")
def wan_ref(loader, wan_file):
    mp, _ = loader.load_quantized(str(wan_file), "none", None, compute_dtype="bf16")
    return hm.run_diffusion_model(mp, hm.wan_inputs())


def _quantized_modules(patcher, pack):
    out = {}
    for name, m in patcher.model.diffusion_model.named_modules():
        if pack.nodes.layouts.is_online_quant(getattr(m, "weight", None)):
            out[name] = m
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_wan_every_eligible_layer_quantized_and_output_close(pack, loader, wan_file, wan_ref, fmt):
    mp, rep = loader.load_quantized(str(wan_file), fmt, "", compute_dtype="bf16")
    assert rep.family == "wan21"
    q = _quantized_modules(mp, pack)
    # empty ignore text: everything eligible is quantized; head.head (out 64 < 256) is kept by size
    assert "head.head" not in q
    assert {"blocks.0.self_attn.q", "blocks.1.ffn.2", "text_embedding.0"} <= set(q)
    assert {r.name for r in rep.quantized()} == set(q)
    assert [r.source for r in rep.kept()] == ["size"]
    for m in q.values():
        assert m.weight._params.format == pack.quant.formats.get_format(fmt).name
    err = hm.rel_err(wan_ref, hm.run_diffusion_model(mp, hm.wan_inputs()))
    assert 0 < err < MAX_ERR[fmt], err


def test_wan_family_defaults_and_auto_marker(pack, loader, wan_file):
    """'# auto' (the node default) = family defaults; patterns below it are added."""
    _, rep_none = loader.load_quantized(str(wan_file), "fp8_e4m3fn", None)
    mp_auto, rep_auto = loader.load_quantized(str(wan_file), "fp8_e4m3fn", AUTO_IGNORE_TEXT)
    assert [r.name for r in rep_none.quantized()] == [r.name for r in rep_auto.quantized()]
    assert all(r.source in ("default", "size") for r in rep_auto.kept())
    # Wan defaults: attention quantized weights-only (its own compute mode), the FFN by the format's
    attn = next(r for r in rep_auto.quantized() if r.name == "blocks.0.self_attn.q")
    ffn = next(r for r in rep_auto.quantized() if r.name == "blocks.0.ffn.0")
    assert attn.compute == "w8a16" and ffn.compute == "auto"
    assert "16 of them weights only" in rep_auto.to_text()  # 2 blocks x 8 attention projections
    block = mp_auto.model.diffusion_model.blocks[0]
    assert block.self_attn.q.weight._params.compute == "w8a16"  # what the forward runs
    assert block.ffn[0].weight._params.compute == "auto"
    _, rep_more = loader.load_quantized(
        str(wan_file), "fp8_e4m3fn", AUTO_IGNORE_TEXT + "blocks.1.ffn\n"
    )
    more = {r.name for r in rep_more.kept()} - {r.name for r in rep_auto.kept()}
    assert more == {"blocks.1.ffn.0", "blocks.1.ffn.2"}


def test_model_size_is_packed_bytes(pack, loader, wan_file):
    plain, _ = loader.load_quantized(str(wan_file), "none", None, compute_dtype="bf16")
    mp, rep = loader.load_quantized(str(wan_file), "mxfp4", "", compute_dtype="bf16")
    packed = 0
    for m in _quantized_modules(mp, pack).values():
        packed += m.weight._qdata.nbytes + m.weight._params.scale.nbytes
    saved = sum(r.bytes_before - r.bytes_after for r in rep.layers)
    assert saved > 0
    assert mp.model_size() == plain.model_size() - saved
    # and the report's packed bytes are the tensors' bytes
    assert sum(r.bytes_after for r in rep.quantized()) == packed
    fmt = pack.quant.formats.get_format("mxfp4")
    assert packed == sum(fmt.packed_nbytes(r.out_features, r.in_features) for r in rep.quantized())


def test_report_text_and_dict(loader, wan_file):
    _, rep = loader.load_quantized(str(wan_file), "fp8_e4m3fn", "blocks.0\nno_such_layer\n")
    d = rep.to_dict()
    assert d["layers_quantized"] == len(rep.quantized()) > 0
    assert d["kept_by_reason"] == {"pattern": 10, "size": 1}  # blocks.0: 8 attention + 2 ffn; head.head
    text = rep.to_text()
    assert "no_such_layer" in text  # the unmatched pattern is warned about
    assert any("no_such_layer" in w for w in rep.warnings)
    assert rep.backend and rep.backend_reason


def test_zimage_plan_and_error(pack, loader, zimage_file):
    with hm.zimage_detection():
        plain, _ = loader.load_quantized(str(zimage_file), "none", None, compute_dtype="bf16")
        ref = hm.run_diffusion_model(plain, hm.zimage_inputs())
        for fmt in ("fp8_e4m3fn", "mxfp4"):
            mp, rep = loader.load_quantized(
                str(zimage_file), fmt, None, compute_dtype="bf16", family="zimage"
            )
            q = _quantized_modules(mp, pack)
            assert "layers.0.attention.qkv" in q and "layers.1.feed_forward.w2" in q
            for kept in ("x_embedder", "cap_embedder.1", "final_layer.linear", "layers.0.adaLN_modulation.0"):
                assert kept not in q
            err = hm.rel_err(ref, hm.run_diffusion_model(mp, hm.zimage_inputs()))
            assert 0 < err < {"fp8_e4m3fn": 0.15, "mxfp4": 0.5}[fmt], (fmt, err)
            assert any("detected 'generic'" in n for n in rep.notes)


def test_generic_model_gets_a_note(loader, zimage_file):
    # without the family override, a Lumina2 model of this width has no tuned defaults
    with hm.zimage_detection():
        _, rep = loader.load_quantized(str(zimage_file), "fp8_e4m3fn", None)
    assert rep.family == "generic"
    assert any("no tuned defaults" in n for n in rep.notes)
    assert len(rep.quantized()) > 0


def test_fresh_ops_class_per_load(pack, loader, wan_file):
    a, _ = loader.load_quantized(str(wan_file), "fp8_e4m3fn", "")
    b, _ = loader.load_quantized(str(wan_file), "mxfp4", "")
    la = a.model.diffusion_model.blocks[0].ffn[0]
    lb = b.model.diffusion_model.blocks[0].ffn[0]
    assert type(la) is not type(lb)
    assert type(la)._oq_state is not type(lb)._oq_state
    assert la.weight._layout_cls != lb.weight._layout_cls


def test_nan_weight_fails_naming_layer_and_leaves_nothing(pack, loader, tmp_path):
    m = hm.wan_model(seed=3)
    with torch.no_grad():
        m.blocks[1].ffn[0].weight[3, 5] = float("nan")
    path = hm.save_model(m, tmp_path / "wan_nan.safetensors")
    created = []
    orig = pack.nodes.ops.OnlineQuantLinear.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        created.append(weakref.ref(self))

    pack.nodes.ops.OnlineQuantLinear.__init__ = spy
    try:
        with pytest.raises(pack.quant.errors.NonFiniteWeightError, match=r"blocks\.1\.ffn\.0"):
            loader.load_quantized(str(path), "fp8_e4m3fn", "")
    finally:
        pack.nodes.ops.OnlineQuantLinear.__init__ = orig
    gc.collect()
    assert created and all(r() is None for r in created), "a half-built model survived the failed load"


def test_bad_pattern_and_bad_format_are_errors(pack, loader, wan_file):
    with pytest.raises(pack.quant.errors.PatternError):
        loader.load_quantized(str(wan_file), "fp8_e4m3fn", "re:([unclosed")
    with pytest.raises(ValueError, match="known formats"):
        loader.load_quantized(str(wan_file), "int3", "")


def test_unreadable_file_is_checkpoint_error(pack, loader, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(pack.quant.errors.CheckpointError, match="broken.safetensors"):
        loader.load_quantized(str(bad), "fp8_e4m3fn", None)


@pytest.mark.parametrize("compute_dtype,dtype", [("auto", None), ("fp16", torch.float16)])
def test_compute_dtypes_run_close_to_bf16(pack, loader, wan_file, wan_ref, compute_dtype, dtype):
    """auto (ComfyUI's choice: fp32 on the CPU) and fp16 activations through the quantized layers."""
    mp, _ = loader.load_quantized(str(wan_file), "fp8_e4m3fn", "", compute_dtype=compute_dtype)
    lin = mp.model.diffusion_model.blocks[0].ffn[0]
    want = dtype or mp.model.get_dtype()
    assert lin.weight.dtype == want and lin.bias.dtype == want
    inputs = {
        k: (v.to(want) if v.is_floating_point() and v.dim() > 1 else v) for k, v in hm.wan_inputs().items()
    }
    out = hm.run_diffusion_model(mp, inputs)
    assert torch.isfinite(out).all()
    assert hm.rel_err(wan_ref, out) < MAX_ERR["fp8_e4m3fn"]
