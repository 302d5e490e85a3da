"""Save Quantized Model (nodes/save_quantized.py) and the loader reading its file back, with the real
ComfyUI: bit-identical packed weights and scales, equal outputs, no quantization on the way back,
LoRA saved applied, and what stock ComfyUI's own loader does with the file (per-tensor FP8: loads
correctly; every other format: refused at load, naming the node to use)."""

from __future__ import annotations

import helpers_models as hm
import pytest
import torch

pytestmark = pytest.mark.comfyui

comfy = None
FORMAT_NOTE = "loaded pre-quantized (format {fmt}, file format version 1) — no quantization"


@pytest.fixture(scope="module")
def mods(pack):
    global comfy
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    return hm.import_submodules(pack, "nodes.loader", "nodes.layouts", "nodes.save_quantized")


@pytest.fixture(scope="module")
def wan_file(comfyui_path, tmp_path_factory):
    return hm.save_model(hm.wan_model(seed=1), tmp_path_factory.mktemp("wans") / "wan_tiny.safetensors")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes on the CPU (a loaded model's weights live on its load device, an
    unloaded one's are offloaded: comparisons must not depend on where)."""
    t = t.detach().cpu()
    return t.reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


def _stored(sd: dict) -> dict[str, torch.Tensor]:
    """Every tensor a model holds, packed weights as their data and scale bytes."""
    out = {}
    for k, v in sd.items():
        if hasattr(v, "_qdata"):
            out[k] = _bits(v._qdata)
            out[k + "#scale"] = _bits(v._params.scale)
        else:
            out[k] = _bits(v)
    return out


def _save(mods, model, out_dir, prefix: str) -> str:
    path, summary = mods.nodes.save_quantized.save_quantized_model(
        model, f"diffusion_models/{prefix}", str(out_dir)
    )
    assert summary.startswith(f"saved diffusion_models/{prefix}_00001_.safetensors: ")
    return path


def _pack_load(mods, path, fmt):
    return mods.nodes.loader.load_quantized(str(path), fmt, "", compute_dtype="bf16")


def _save_and_reload(mods, model, tmp_path, fmt, inputs, asked=None):
    path = _save(mods, model, tmp_path, f"saved_{fmt}")
    mp, rep = _pack_load(mods, path, asked or fmt)
    y = hm.run_diffusion_model(mp, inputs)
    return path, mp, rep, y


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
def test_saved_file_reloads_bit_identical_without_quantizing(mods, wan_file, tmp_path, fmt):
    inp = hm.wan_inputs()
    with torch.inference_mode():
        mp, rep = _pack_load(mods, wan_file, fmt)
        y = hm.run_diffusion_model(mp, inp)
        before = _stored(mp.model.diffusion_model.state_dict())
        _, mp2, rep2, y2 = _save_and_reload(mods, mp, tmp_path, fmt, inp)
        after = _stored(mp2.model.diffusion_model.state_dict())
        comfy.model_management.unload_all_models()
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert torch.equal(y, y2)
    assert rep2.format == fmt and not rep2.warnings
    assert FORMAT_NOTE.format(fmt=fmt) in rep2.to_text()
    assert rep2.quantize_seconds == 0.0  # the quantizer never ran
    assert [r.name for r in rep2.quantized()] == [r.name for r in rep.quantized()]
    assert all(
        r.sqnr_db is None and r.reason.startswith("pre-quantized in the file") for r in rep2.quantized()
    )
    assert [r.name for r in rep2.kept()] == [r.name for r in rep.kept()]
    assert rep2.linear_bytes_after() == rep.linear_bytes_after()


def test_zimage_saved_file_reloads_bit_identical(mods, tmp_path):
    path = hm.save_model(hm.zimage_model(seed=2), tmp_path / "zimage_tiny.safetensors")
    inp = hm.zimage_inputs()
    with hm.zimage_detection(), torch.inference_mode():
        # the tiny width is not detected as Z-Image: the family the load was told is the one saved
        mp, rep = mods.nodes.loader.load_quantized(
            str(path), "mxfp4", None, compute_dtype="bf16", family="zimage"
        )
        y = hm.run_diffusion_model(mp, inp)
        saved, mp2, rep2, y2 = _save_and_reload(mods, mp, tmp_path, "mxfp4", inp)
        comfy.model_management.unload_all_models()
    assert rep.family == rep2.family == "zimage"
    from comfyui_online_quant.quant.checkpoint import read_header, read_packed_info

    assert read_packed_info(read_header(saved)).family == "zimage"
    assert torch.equal(y, y2) and len(rep2.quantized()) == len(rep.quantized()) > 0


def test_lora_is_saved_applied_and_the_cached_model_keeps_its_weights(mods, wan_file, tmp_path):
    key = "blocks.0.ffn.0"
    g = torch.Generator().manual_seed(3)
    lora = {
        f"diffusion_model.{key}.lora_up.weight": torch.randn(hm.WAN_FFN, 4, generator=g) * 0.1,
        f"diffusion_model.{key}.lora_down.weight": torch.randn(4, hm.WAN_DIM, generator=g) * 0.1,
    }
    inp = hm.wan_inputs()
    with torch.inference_mode():
        mp, _ = _pack_load(mods, wan_file, "fp8_e4m3fn")
        unpatched = _stored(mp.model.diffusion_model.state_dict())
        ml, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
        y_lora = hm.run_diffusion_model(ml, inp)  # the LoRA patched in, as sampling does
        comfy.model_management.unload_all_models()
        y_plain = hm.run_diffusion_model(mp, inp)
        _, _, _, y_saved = _save_and_reload(mods, ml, tmp_path, "fp8_e4m3fn", inp)
        comfy.model_management.unload_all_models()
        restored = _stored(mp.model.diffusion_model.state_dict())
    assert hm.rel_err(y_plain, y_lora) > 1e-3  # the LoRA acts
    assert torch.equal(y_saved, y_lora)  # and the file holds the patched weights
    assert [k for k in unpatched if not torch.equal(unpatched[k], restored[k])] == []


@pytest.mark.parametrize("asked", ["fp8_e4m3fn", "none"])
def test_a_request_for_another_format_loads_the_file_as_saved(mods, wan_file, tmp_path, asked):
    inp = hm.wan_inputs()
    with torch.inference_mode():
        mp, _ = _pack_load(mods, wan_file, "mxfp4")
        y = hm.run_diffusion_model(mp, inp)
        _, _, rep, y2 = _save_and_reload(mods, mp, tmp_path, "mxfp4", inp, asked=asked)
        comfy.model_management.unload_all_models()
    assert torch.equal(y, y2) and rep.format == "mxfp4"
    (w,) = rep.warnings
    assert "loaded as saved (mxfp4)" in w and "wan_tiny.safetensors" in w
    assert f"WARNING: {w}" in rep.to_text()


def _stock_load_and_run(path, inp):
    stock = comfy.sd.load_diffusion_model(str(path), {})  # ComfyUI's own UNETLoader path
    dtype = stock.model.manual_cast_dtype or stock.model.get_dtype()
    inp = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inp.items()}
    return hm.run_diffusion_model(stock, inp)


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4", "fp8_e4m3fnuz"])
def test_stock_comfyui_refuses_what_it_cannot_read_at_load(mods, wan_file, tmp_path, fmt):
    with torch.inference_mode():
        mp, _ = _pack_load(mods, wan_file, fmt)
        path = _save(mods, mp, tmp_path, f"stock_{fmt}")
        comfy.model_management.unload_all_models()
        with pytest.raises(KeyError) as e:
            _stock_load_and_run(path, hm.wan_inputs())
    msg = str(e.value)
    assert msg.startswith(f"'{fmt} (saved by ComfyUI-OnlineQuant") or msg.startswith(f'"{fmt} (saved by')
    assert "load this file with the 'Load Diffusion Model FP8/MXFP4 (Online Quant)' node" in msg


def test_stock_comfyui_loads_per_tensor_fp8_correctly(mods, wan_file, tmp_path):
    inp = hm.wan_inputs()
    with torch.inference_mode():
        mp, _ = _pack_load(mods, wan_file, "fp8_e4m3fn_tensor")
        y = hm.run_diffusion_model(mp, inp)
        path = _save(mods, mp, tmp_path, "stock_tensor")
        comfy.model_management.unload_all_models()
        y_stock = _stock_load_and_run(path, inp)
        y_ref = _stock_load_and_run(wan_file, inp)
        comfy.model_management.unload_all_models()
    assert torch.isfinite(y_stock).all()
    assert hm.rel_err(y, y_stock) < 0.02  # what the pack's model computes (scale applied in fp32 vs bf16)
    assert hm.rel_err(y_ref, y_stock) < 0.1


def test_model_save_of_a_reloaded_file_writes_the_dequantized_model(mods, wan_file, tmp_path):
    import glob

    from comfy_extras.nodes_model_merging import save_checkpoint

    inp = hm.wan_inputs()
    with torch.inference_mode():
        mp, _ = _pack_load(mods, wan_file, "mxfp4")
        _, mp2, _, y2 = _save_and_reload(mods, mp, tmp_path, "mxfp4", inp)
        save_checkpoint(mp2, filename_prefix="diffusion_models/plain", output_dir=str(tmp_path))
        comfy.model_management.unload_all_models()
        (plain,) = glob.glob(str(tmp_path / "diffusion_models" / "plain_*.safetensors"))
        y_stock = _stock_load_and_run(plain, inp)
        comfy.model_management.unload_all_models()
    assert torch.isfinite(y_stock).all() and hm.rel_err(y2, y_stock) < 1e-2


def test_save_refuses_a_model_that_is_not_quantized(mods, wan_file, tmp_path):
    with torch.inference_mode():
        mp, _ = _pack_load(mods, wan_file, "none")
        with pytest.raises(ValueError, match="the model has no layers quantized by this pack") as e:
            _save(mods, mp, tmp_path, "plain")
        comfy.model_management.unload_all_models()
    assert "'ModelSave'" in str(e.value)
    assert not list(tmp_path.rglob("*.safetensors"))
