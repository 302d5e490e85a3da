"""LoRA on online-quantized models through ComfyUI's own machinery (LoraLoaderModelOnly's
`comfy.sd.load_lora_for_models`, ModelPatcher full load and lowvram), unpatching, clones."""

from __future__ import annotations

import helpers_models as hm
import pytest
import torch

pytestmark = pytest.mark.comfyui

WAN_LORA_LAYERS = {
    "blocks.0.ffn.0": (hm.WAN_FFN, hm.WAN_DIM),
    "blocks.1.cross_attn.k": (hm.WAN_DIM, hm.WAN_DIM),
}


def _lora(layers: dict, seed: int = 5, scale: float = 0.1, names: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (n, k) in layers.items():
        key = (names or {}).get(name, name)
        sd[f"diffusion_model.{key}.lora_up.weight"] = torch.randn(n, 4, generator=g) * scale
        sd[f"diffusion_model.{key}.lora_down.weight"] = torch.randn(4, k, generator=g) * scale
    return sd


comfy = None  # imported by the `mods` fixture, once ComfyUI is on sys.path


@pytest.fixture(scope="module")
def mods(pack):
    global comfy
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    return hm.import_submodules(
        pack, "nodes.loader", "nodes.layouts", "nodes.ops", "quant.errors", "quant.formats"
    )


@pytest.fixture(scope="module")
def wan_file(comfyui_path, tmp_path_factory):
    return hm.save_model(hm.wan_model(seed=1), tmp_path_factory.mktemp("wanl") / "wan_tiny.safetensors")


def _get(model, key):
    return comfy.utils.get_attr(model, key)


def _snapshot(patcher):
    """(qdata, scale) copies of every quantized weight, on the CPU (the model may sit on a GPU)."""
    out = {}
    for name, m in patcher.model.diffusion_model.named_modules():
        w = getattr(m, "weight", None)
        if hasattr(w, "_qdata"):
            out[name] = (w._qdata.cpu().clone(), w._params.scale.cpu().clone())
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k][0].view(torch.uint8), b[k][0].view(torch.uint8)), k
        assert torch.equal(a[k][1], b[k][1]), k


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
def test_lora_full_load_requantizes_exactly_and_unpatch_restores(mods, wan_file, fmt):
    mp, _ = mods.nodes.loader.load_quantized(str(wan_file), fmt, "", compute_dtype="bf16")
    inp = hm.wan_inputs()
    before = _snapshot(mp)
    y0 = hm.run_diffusion_model(mp, inp)
    comfy.model_management.unload_all_models()

    ml, _ = comfy.sd.load_lora_for_models(mp, None, _lora(WAN_LORA_LAYERS), 1.0, 0)
    assert set(ml.patches) == {f"diffusion_model.{n}.weight" for n in WAN_LORA_LAYERS}
    # the exact patched result: on the load device, dequantize in ComfyUI's LoRA dtype for that
    # device (fp32 on CPU, fp16 on most GPUs), add the LoRA, requantize
    dev = ml.load_device
    expected = {}
    for key in ml.patches:
        w = comfy.utils.get_attr(ml.model, key).to(dev)
        base = w.to(comfy.model_management.lora_compute_dtype(dev), copy=True).dequantize()
        expected[key] = mods.quant.formats.get_format(fmt).quantize(
            comfy.lora.calculate_weight(ml.patches[key], base, key)
        )
    y1 = hm.run_diffusion_model(ml, inp)
    for key, qw in expected.items():
        got = comfy.utils.get_attr(ml.model, key).to(dev)
        assert mods.nodes.layouts.is_online_quant(got)
        assert torch.equal(got._qdata.view(torch.uint8), qw.qdata.view(torch.uint8)), key
        assert torch.equal(got._params.scale, qw.scale), key
    assert hm.rel_err(y0, y1) > 0.01  # the LoRA does something

    comfy.model_management.unload_all_models()  # unpatch
    _same(before, _snapshot(mp))
    assert torch.equal(hm.run_diffusion_model(mp, inp), y0)
    comfy.model_management.unload_all_models()


def test_lora_lowvram_matches_exact_patched_weights(mods, wan_file):
    mp, _ = mods.nodes.loader.load_quantized(str(wan_file), "fp8_e4m3fn", "", compute_dtype="bf16")
    inp = hm.wan_inputs()
    before = _snapshot(mp)
    ml, _ = comfy.sd.load_lora_for_models(mp, None, _lora(WAN_LORA_LAYERS), 1.0, 0)

    # exact reference: the LoRA'd layers run with dequant(W) + LoRA in the activation dtype
    # (what ComfyUI's LowVramPatch computes), every other layer unchanged
    saved = {}
    for key in ml.patches:
        w = comfy.utils.get_attr(mp.model, key)
        deq = w.dequantize()
        saved[key] = w
        patched = comfy.lora.calculate_weight(ml.patches[key], deq, key, intermediate_dtype=deq.dtype)
        comfy.utils.set_attr_param(mp.model, key, patched)
    with torch.no_grad():
        y_exact = mp.model.diffusion_model(**inp, transformer_options={}).float()
    for key, w in saved.items():
        comfy.utils.set_attr_param(mp.model, key, w)

    ml.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)  # everything offloaded
    try:
        lin = ml.model.diffusion_model.blocks[0].ffn[0]
        assert ml.model.model_lowvram and lin.comfy_cast_weights and len(lin.weight_function) == 1
        with torch.no_grad():
            y_low = ml.model.diffusion_model(**inp, transformer_options={}).float()
    finally:
        ml.unpatch_model()
    assert hm.rel_err(y_exact, y_low) < 1e-3
    _same(before, _snapshot(mp))


def test_lora_on_fused_zimage_qkv(mods, comfyui_path, tmp_path):
    path = hm.save_model(hm.zimage_model(seed=2), tmp_path / "zimage_tiny.safetensors")
    with hm.zimage_detection():
        mp, rep = mods.nodes.loader.load_quantized(
            str(path), "fp8_e4m3fn", None, compute_dtype="bf16", family="zimage"
        )
    assert "layers.0.attention.qkv" in {r.name for r in rep.quantized()}
    d = hm.ZIMAGE_DIM
    parts = {f"layers.0.attention.{p}": (d, d) for p in ("to_q", "to_k", "to_v")}
    ml, _ = comfy.sd.load_lora_for_models(mp, None, _lora(parts, scale=0.2), 1.0, 0)
    key = "diffusion_model.layers.0.attention.qkv.weight"
    assert list(ml.patches) == [key] and len(ml.patches[key]) == 3  # q, k, v slices of the fused weight
    before = _snapshot(mp)
    inp = hm.zimage_inputs()
    y0 = hm.run_diffusion_model(mp, inp)
    comfy.model_management.unload_all_models()
    y1 = hm.run_diffusion_model(ml, inp)
    w = comfy.utils.get_attr(ml.model, key)
    base = before["layers.0.attention.qkv"]
    # every third of the fused weight changed (q, k and v each got their slice)
    changed = (w._qdata.cpu().view(torch.uint8) != base[0].view(torch.uint8)).float().mean(dim=1)
    assert all(changed[i * d : (i + 1) * d].mean() > 0.5 for i in range(3))
    assert hm.rel_err(y0, y1) > 0.01
    comfy.model_management.unload_all_models()
    _same(before, _snapshot(mp))


def test_clones_share_nothing_mutable(mods, wan_file):
    mp, _ = mods.nodes.loader.load_quantized(str(wan_file), "mxfp4", "", compute_dtype="bf16")
    inp = hm.wan_inputs()
    y0 = hm.run_diffusion_model(mp, inp)
    comfy.model_management.unload_all_models()
    c = mp.clone()
    c.add_patches(
        comfy.lora.load_lora(_lora(WAN_LORA_LAYERS), comfy.lora.model_lora_keys_unet(c.model, {})), 1.0
    )
    c.model_options.setdefault("transformer_options", {})["marker"] = 1
    assert mp.patches == {} and "marker" not in mp.model_options.get("transformer_options", {})
    y_c = hm.run_diffusion_model(c, inp)
    comfy.model_management.unload_all_models()
    assert hm.rel_err(y0, y_c) > 0.01
    assert torch.equal(hm.run_diffusion_model(mp, inp), y0)  # the original is untouched
    comfy.model_management.unload_all_models()


def test_set_weight_inplace_and_return_weight(mods, wan_file):
    mp, _ = mods.nodes.loader.load_quantized(str(wan_file), "fp8_e4m3fn", "", compute_dtype="bf16")
    lin = mp.model.diffusion_model.blocks[0].ffn[0]
    w = lin.weight
    qdata_ptr = w._qdata.data_ptr()
    new = torch.randn(lin.out_features, lin.in_features) * 0.05
    ret = lin.set_weight(new, return_weight=True)
    assert mods.nodes.layouts.is_online_quant(ret) and lin.weight is w  # nothing replaced
    lin.set_weight(new, inplace_update=True, seed=123)
    assert lin.weight is w and w._qdata.data_ptr() == qdata_ptr  # same storage, new values
    # `ret` is quantized where `new` is (the CPU), the weight lives on the model's load device
    assert torch.equal(w._qdata.view(torch.uint8).cpu(), ret._qdata.view(torch.uint8).cpu())
    assert torch.equal(w._params.scale.cpu(), ret._params.scale.cpu())
    assert hm.rel_err(new, lin.convert_weight(w).float().cpu()) < 0.05


def test_partially_unloaded_model_runs_the_same(mods, wan_file):
    """ComfyUI frees memory by partially unloading a loaded model (modules switch to cast
    weights, moved per forward as packed bytes): the output must not change."""
    mp, _ = mods.nodes.loader.load_quantized(str(wan_file), "mxfp4", "", compute_dtype="bf16")
    inp = hm.wan_inputs()
    y0 = hm.run_diffusion_model(mp, inp)
    freed = mp.partially_unload(mp.offload_device, 2 * 10**6)
    try:
        assert freed > 0 and mp.model.model_lowvram
        assert any(
            getattr(m, "comfy_cast_weights", False) for m in mp.model.diffusion_model.blocks[0].modules()
        )
        dev = mp.load_device
        with torch.no_grad():
            inputs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in inp.items()}
            y1 = mp.model.diffusion_model(**inputs, transformer_options={}).float().cpu()
        assert hm.rel_err(y0, y1) < 1e-3
    finally:
        comfy.model_management.unload_all_models()
