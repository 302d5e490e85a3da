"""A quantized MODEL in every weight-patching path of ComfyUI's ModelPatcher and hooks: every
state-dict key resolves, backups are real copies (also under inference mode), hook LoRA in both
hook modes through ComfyUI's real sampler restores the cached model bit for bit, merges with the
quantized model on either side, clones."""

from __future__ import annotations

import helpers_models as hm
import pytest
import torch

pytestmark = pytest.mark.comfyui

comfy = None  # imported by the `mods` fixture, once ComfyUI is on sys.path

LORA_LAYERS = {
    "blocks.0.ffn.0": (hm.WAN_FFN, hm.WAN_DIM),
    "blocks.1.cross_attn.k": (hm.WAN_DIM, hm.WAN_DIM),
}
WATCH = "diffusion_model.blocks.0.ffn.0.weight"


def _lora(layers: dict, seed: int = 5, scale: float = 0.1) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (n, k) in layers.items():
        sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(n, 4, generator=g) * scale
        sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, k, generator=g) * scale
    return sd


@pytest.fixture(scope="module")
def mods(pack):
    global comfy
    import comfy.hooks
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.sample
    import comfy.utils

    return hm.import_submodules(pack, "nodes.loader", "nodes.layouts", "nodes.ops", "quant.formats")


@pytest.fixture(scope="module")
def wan_file(comfyui_path, tmp_path_factory):
    return hm.save_model(hm.wan_model(seed=1), tmp_path_factory.mktemp("wanc") / "wan_tiny.safetensors")


@pytest.fixture(scope="module")
def wan2_file(comfyui_path, tmp_path_factory):
    return hm.save_model(hm.wan_model(seed=7), tmp_path_factory.mktemp("wanc2") / "wan_tiny2.safetensors")


def _load(mods, path, fmt):
    mp, _ = mods.nodes.loader.load_quantized(
        str(path), fmt, "" if fmt != "none" else None, compute_dtype="bf16"
    )
    return mp


def _snapshot(patcher):
    """(qdata bytes, scale) clones of every quantized weight."""
    out = {}
    for name, m in patcher.model.diffusion_model.named_modules():
        w = getattr(m, "weight", None)
        if hasattr(w, "_qdata"):
            out[name] = (w._qdata.view(torch.uint8).cpu().clone(), w._params.scale.cpu().clone())
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k][0], b[k][0]), f"{k}: packed data changed"
        assert torch.equal(a[k][1], b[k][1]), f"{k}: scale changed"


def _conds(seed=3):
    g = torch.Generator().manual_seed(seed)
    pos = [[(torch.randn(1, 12, 4096, generator=g) * 0.5), {}]]
    neg = [[(torch.randn(1, 12, 4096, generator=g) * 0.5), {}]]
    return pos, neg


def _sample(mp, pos, neg, steps=4, callback=None):
    latent = torch.zeros(1, 16, 1, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():  # what ComfyUI's executor runs nodes under
        return comfy.sample.sample(
            mp,
            noise,
            steps,
            2.0,
            "euler",
            "simple",
            pos,
            neg,
            latent,
            disable_pbar=True,
            seed=11,
            callback=callback,
        )


# ---- the tensor contract ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
@pytest.mark.parametrize("inference", [False, True])
def test_to_copy_is_a_real_copy_of_data_and_scale(mods, fmt, inference):
    lay = mods.nodes.layouts
    w = torch.nn.Parameter(
        lay.quantize_to_tensor(torch.randn(64, 64), fmt, torch.bfloat16), requires_grad=False
    )
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        for c in (
            w.to(device="cpu", copy=True),
            w.to(torch.float32, copy=True),
            w.to("cpu", torch.bfloat16, copy=True),
        ):
            assert lay.is_online_quant(c) and c is not w
            assert c._qdata.data_ptr() != w._qdata.data_ptr()
            assert c._params.scale.data_ptr() != w._params.scale.data_ptr()
            assert torch.equal(c._qdata.view(torch.uint8), w._qdata.view(torch.uint8))
            assert torch.equal(c._params.scale, w._params.scale)
        assert w.to(device="cpu") is w  # no copy asked: no copy made


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
def test_copy_to_param_restores_data_and_scale(mods, fmt):
    """ModelPatcher's restore is `param.data.copy_(backup)`: both halves must come back."""
    lay = mods.nodes.layouts
    mod = torch.nn.Module()
    mod.weight = torch.nn.Parameter(lay.quantize_to_tensor(torch.randn(64, 64), fmt, torch.bfloat16), False)
    before = (mod.weight._qdata.view(torch.uint8).clone(), mod.weight._params.scale.clone())
    with torch.inference_mode():
        backup = mod.weight.to(device="cpu", copy=True)
        comfy.utils.copy_to_param(mod, "weight", torch.randn(64, 64) * 3)  # a plain float value: quantized
        assert not torch.equal(mod.weight._params.scale, before[1])
        assert lay.is_online_quant(mod.weight)
        comfy.utils.copy_to_param(mod, "weight", backup)
    assert torch.equal(mod.weight._qdata.view(torch.uint8), before[0])
    assert torch.equal(mod.weight._params.scale, before[1])
    # a plain float copied in is stored in the weight's own format, as quantizing it would
    v = torch.randn(64, 64)
    comfy.utils.copy_to_param(mod, "weight", v)
    qw = mods.quant.formats.get_format(fmt).quantize(v)
    assert torch.equal(mod.weight._qdata.view(torch.uint8), qw.qdata.view(torch.uint8))
    assert torch.equal(mod.weight._params.scale, qw.scale)


def test_every_state_dict_key_resolves(mods, wan_file):
    """ModelPatcher looks up an attribute for every key state_dict() reports (get_key_patches:
    merges, hooks); the packed weight's bytes (data + scale) are still what model_size counts."""
    mp = _load(mods, wan_file, "mxfp4")
    sd = mp.model.state_dict()
    for k in sd:
        comfy.model_patcher.get_key_weight(mp.model, k)
    kp = mp.get_key_patches("diffusion_model.")
    assert set(kp) == {k for k in sd if k.startswith("diffusion_model.")}
    w = comfy.utils.get_attr(mp.model, WATCH)
    assert sd[WATCH].nbytes == w._qdata.nbytes + w._params.scale.nbytes


# ---- hook (scheduled) LoRA through ComfyUI's sampler ------------------------------------------
def _expected_hooked(mp, lora_sd):
    """The exact hook-patched weight: dequantize in fp32, add the LoRA, requantize."""
    key_map = comfy.lora.model_lora_keys_unet(mp.model, {})
    patches = comfy.lora.load_lora(lora_sd, key_map)
    w = comfy.utils.get_attr(mp.model, WATCH)
    base = w.to(torch.float32, copy=True).dequantize().cpu()
    out = comfy.lora.calculate_weight([(1.0, patches[WATCH], 1.0, None, None)], base, WATCH)
    return out


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
@pytest.mark.parametrize("mode", ["maxspeed", "minvram"])
def test_hook_lora_sampling_restores_the_cached_model(mods, wan_file, fmt, mode):
    """Hook LoRA on the positive prompt only (two hook groups: ComfyUI keeps MaxSpeed and swaps
    the weights at every step) or on both prompts (one group: ComfyUI switches to MinVram).
    Every restore gives back the original weight exactly, every hooked step sees the exact
    LoRA'd weight, and after sampling the cached model is bit-identical and samples as before."""
    with torch.inference_mode():  # ComfyUI runs its nodes, loaders included, in inference mode
        mp = _load(mods, wan_file, fmt)
    fmt_obj = mods.quant.formats.get_format(fmt)
    pos, neg = _conds()
    before = _snapshot(mp)
    y_plain = _sample(mp, pos, neg)
    comfy.model_management.unload_all_models()
    _assert_same(before, _snapshot(mp))

    lora_sd = _lora(LORA_LAYERS)
    hooks = comfy.hooks.create_hook_lora(lora_sd, strength_model=1.0, strength_clip=1.0)
    (pos_h,) = comfy.hooks.set_conds_props([pos], 1.0, "default", hooks=hooks)
    neg_h = comfy.hooks.set_conds_props([neg], 1.0, "default", hooks=hooks)[0] if mode == "minvram" else neg

    orig_deq = comfy.utils.get_attr(mp.model, WATCH).dequantize().float().cpu()
    want = _expected_hooked(mp, lora_sd)
    restore_err, hooked_ok, modes = [], [], []

    def on_apply(patcher, applied):
        w = comfy.utils.get_attr(patcher.model, WATCH)
        modes.append(patcher.hook_mode.value)
        if applied is None:  # just restored
            restore_err.append(hm.rel_err(orig_deq, w.dequantize().float().cpu()))
        else:
            got = fmt_obj.dequantize(mods.nodes.layouts.as_quantized_weight(w), torch.float32).cpu()
            hooked_ok.append(_requantized_matches(fmt_obj, want, got))

    m = mp.clone()
    m.add_callback(comfy.patcher_extension.CallbacksMP.ON_APPLY_HOOKS, on_apply)
    y_hooked = _sample(m, pos_h, neg_h)
    comfy.model_management.unload_all_models()

    assert hooked_ok and all(hooked_ok), hooked_ok
    assert set(modes) == {mode}
    if mode == "maxspeed":
        assert len(restore_err) >= 3  # swapped back at every step
    assert restore_err == [0.0] * len(restore_err)
    assert hm.rel_err(y_plain, y_hooked) > 1e-3  # the LoRA did something
    _assert_same(before, _snapshot(mp))
    assert torch.equal(_sample(mp, pos, neg), y_plain)  # a plain run after equals a never-hooked run
    comfy.model_management.unload_all_models()
    _assert_same(before, _snapshot(mp))


# ---- merges ----------------------------------------------------------------------------------
def _merge_nodes():
    from comfy_extras import nodes_model_merging as nm

    return nm


def _deq_model(mp) -> dict:
    """The weights ComfyUI patches (parameters of leaf modules) as plain fp32, quantized ones
    dequantized in fp32 as ComfyUI's patching does on the CPU."""
    out = {}
    for name, m in mp.model.diffusion_model.named_modules():
        if next(m.children(), None) is not None:
            continue
        for pn, v in m.named_parameters(recurse=False):
            out[f"{name}.{pn}"] = (
                (v.to(torch.float32).dequantize() if hasattr(v, "_qdata") else v).detach().float().cpu()
            )
    return out


def _requantized_matches(fmt, want: torch.Tensor, got: torch.Tensor) -> bool:
    """got (fp32, dequantized) is `want` requantized in fmt. Bit for bit where ComfyUI patches on
    the CPU, which is where this expectation is computed; on a GPU ComfyUI's patch arithmetic
    (fused multiply-adds, TF32 LoRA products) differs in the last fp32 bits, which moves a value
    across a rounding boundary of the format now and then: there at most 1 in 1000 elements may
    differ, and the whole stays within 1e-3 of the requantized expectation (quantization itself
    is ~100x coarser)."""
    exp = fmt.dequantize(fmt.quantize(want), torch.float32)
    if comfy.model_management.get_torch_device().type == "cpu":
        return torch.equal(exp, got)
    return (exp != got).float().mean().item() <= 1e-3 and hm.rel_err(exp, got) < 1e-3


def _is_quantized(mp, key) -> bool:
    return hasattr(mp.model.diffusion_model.get_parameter(key), "_qdata")


@pytest.mark.parametrize("quantized_side", ["model1", "model2", "both"])
def test_merge_simple_with_a_quantized_model(mods, wan_file, wan2_file, quantized_side):
    """ModelMergeSimple = model1 * ratio + model2 * (1 - ratio) on every patched weight: exact
    (then requantized in model1's format) when model1 is quantized; model2's packed weights are
    read dequantized. Neither input changes."""
    nm = _merge_nodes()
    ratio = 0.25
    with torch.inference_mode():
        m1 = _load(mods, wan_file, "fp8_e4m3fn" if quantized_side != "model2" else "none")
        m2 = _load(mods, wan2_file, "mxfp4" if quantized_side != "model1" else "none")
        w1, w2 = _deq_model(m1), _deq_model(m2)
        s1, s2 = _snapshot(m1), _snapshot(m2)
        (merged,) = nm.ModelMergeSimple().merge(m1, m2, ratio)
        y = hm.run_diffusion_model(merged, hm.wan_inputs())
        got = _deq_model(merged)
        comfy.model_management.unload_all_models()
    assert torch.isfinite(y).all()
    fmt = mods.quant.formats.get_format("fp8_e4m3fn")
    n_quantized = 0
    for k in got:
        want = w1[k] * ratio + w2[k] * (1 - ratio)
        if _is_quantized(merged, k):
            n_quantized += 1
            assert _requantized_matches(fmt, want, got[k]), k
        else:
            assert hm.rel_err(want, got[k]) < 1e-2, k  # stored in bf16
    assert n_quantized > 0 if quantized_side != "model2" else n_quantized == 0
    _assert_same(s1, _snapshot(m1))
    _assert_same(s2, _snapshot(m2))


@pytest.mark.parametrize("node", ["ModelMergeAdd", "ModelMergeSubtract", "ModelMergeBlocks"])
def test_other_merge_nodes_with_quantized_models(mods, wan_file, wan2_file, node):
    nm = _merge_nodes()
    cls = nm.NODE_CLASS_MAPPINGS[node]
    with torch.inference_mode():
        m1 = _load(mods, wan_file, "fp8_e4m3fn")
        m2 = _load(mods, wan2_file, "mxfp4")
        w1, w2 = _deq_model(m1), _deq_model(m2)
        if node == "ModelMergeAdd":
            (merged,) = cls().merge(m1, m2)
            expect = {k: w1[k] + w2[k] for k in w1}
        elif node == "ModelMergeSubtract":
            (merged,) = cls().merge(m1, m2, 0.5)
            expect = {k: 0.5 * w1[k] - 0.5 * w2[k] for k in w1}
        else:  # "blocks" prefix 0.25, everything else (first kwarg: input) 0.5
            (merged,) = cls().merge(m1, m2, input=0.5, blocks=0.25)
            expect = {k: (0.25 if k.startswith("blocks") else 0.5) for k in w1}
            expect = {k: w1[k] * r + w2[k] * (1 - r) for k, r in expect.items()}
        y = hm.run_diffusion_model(merged, hm.wan_inputs())
        got = _deq_model(merged)
        comfy.model_management.unload_all_models()
    assert torch.isfinite(y).all()
    fmt = mods.quant.formats.get_format("fp8_e4m3fn")
    for k in ("blocks.0.ffn.0.weight", "text_embedding.0.weight"):
        assert _is_quantized(merged, k)
        assert _requantized_matches(fmt, expect[k], got[k]), k
