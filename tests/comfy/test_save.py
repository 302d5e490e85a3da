"""Saving a quantized MODEL with ComfyUI's ModelSave / CheckpointSave path (`save_checkpoint`):
the file stock ComfyUI loads is the dequantized model (finite, equal weights), never packed bytes
declared as bf16."""

from __future__ import annotations

import glob

import helpers_models as hm
import pytest
import torch

pytestmark = pytest.mark.comfyui

comfy = None


@pytest.fixture(scope="module")
def mods(pack):
    global comfy
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    return hm.import_submodules(pack, "nodes.loader", "nodes.layouts", "quant.formats")


@pytest.fixture(scope="module")
def wan_file(comfyui_path, tmp_path_factory):
    return hm.save_model(hm.wan_model(seed=1), tmp_path_factory.mktemp("wans") / "wan_tiny.safetensors")


def _model_save(model, out_dir) -> str:
    from comfy_extras.nodes_model_merging import save_checkpoint

    save_checkpoint(model, filename_prefix="diffusion_models/saved", output_dir=str(out_dir))
    (path,) = glob.glob(str(out_dir / "diffusion_models" / "saved_*.safetensors"))
    return path


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
def test_model_save_writes_the_dequantized_model(mods, wan_file, tmp_path, fmt):
    with torch.inference_mode():
        mp, rep = mods.nodes.loader.load_quantized(str(wan_file), fmt, "", compute_dtype="bf16")
        quantized = {
            f"{r.name}.weight": comfy.utils.get_attr(
                mp.model.diffusion_model, f"{r.name}.weight"
            ).dequantize()
            for r in rep.quantized()
        }
        inp = hm.wan_inputs()
        y_q = hm.run_diffusion_model(mp, inp)
        path = _model_save(mp, tmp_path)
        comfy.model_management.unload_all_models()

        sd = comfy.utils.load_torch_file(path)
        for name, w in quantized.items():
            saved = sd[f"model.diffusion_model.{name}"]
            assert saved.dtype == torch.bfloat16 and saved.shape == w.shape
            assert torch.equal(saved, w.cpu()), name  # the model's weights live on its load device
        stock = comfy.sd.load_diffusion_model(path, {"dtype": torch.bfloat16})  # stock: no custom ops
        y_stock = hm.run_diffusion_model(stock, inp)
        ref = comfy.sd.load_diffusion_model(str(wan_file), {"dtype": torch.bfloat16})
        y_ref = hm.run_diffusion_model(ref, inp)
        comfy.model_management.unload_all_models()
    assert torch.isfinite(y_stock).all()
    # the saved model computes what the quantized one did, up to the activation quantization that
    # FP8 tensor cores add on a GPU (W8A8) and the dequantized bf16 model does not have
    act_quant = fmt == "fp8_e4m3fn" and mp.load_device.type == "cuda"
    assert hm.rel_err(y_q, y_stock) < (5e-2 if act_quant else 1e-2)
    assert hm.rel_err(y_ref, y_stock) < (0.1 if fmt == "fp8_e4m3fn" else 0.3)
    # the quantized model still runs packed
    assert mods.nodes.layouts.is_online_quant(comfy.utils.get_attr(mp.model, f"diffusion_model.{name}"))


def test_model_save_after_lora_saves_the_patched_weights(mods, wan_file, tmp_path):
    with torch.inference_mode():
        mp, _ = mods.nodes.loader.load_quantized(str(wan_file), "fp8_e4m3fn", "", compute_dtype="bf16")
        g = torch.Generator().manual_seed(3)
        key = "blocks.0.ffn.0"
        lora = {
            f"diffusion_model.{key}.lora_up.weight": torch.randn(hm.WAN_FFN, 4, generator=g) * 0.1,
            f"diffusion_model.{key}.lora_down.weight": torch.randn(4, hm.WAN_DIM, generator=g) * 0.1,
        }
        ml, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
        before = comfy.utils.get_attr(mp.model, f"diffusion_model.{key}.weight").dequantize()
        path = _model_save(ml, tmp_path)
        comfy.model_management.unload_all_models()
        after = comfy.utils.get_attr(mp.model, f"diffusion_model.{key}.weight").dequantize()
    saved = comfy.utils.load_torch_file(path)[f"model.diffusion_model.{key}.weight"]
    assert hm.rel_err(before, saved) > 0.01  # the LoRA is in the file
    assert torch.equal(before.cpu(), after.cpu())  # and no longer in the cached model (offloaded)


def test_raw_bytes_of_a_quantized_weight_are_refused(mods, wan_file, tmp_path):
    """Code that writes a state dict as it is (safetensors' save_file: LoraSave's full_diff does)
    gets the pack's error naming the weight's packing, not a file of packed bytes declared bf16
    followed by the memory after them; what ComfyUI's saves go through (state_dict_for_saving,
    dequantize()) is unchanged."""
    from safetensors.torch import save_file

    errors = hm.import_submodules(mods, "quant.errors").quant.errors
    mp, rep = mods.nodes.loader.load_quantized(str(wan_file), "mxfp4", "", compute_dtype="bf16")
    name = rep.quantized()[0].name
    w = comfy.utils.get_attr(mp.model.diffusion_model, f"{name}.weight")
    out = tmp_path / "raw.safetensors"
    for value in (w, w.half(), mp.model.diffusion_model.state_dict()[f"{name}.weight"]):
        with pytest.raises(
            errors.PackedWeightError, match=r"mxfp4: \d+x\d+ b?float16 packed into \d+x\d+ uint8"
        ):
            save_file({"w": value.contiguous()}, str(out))
    assert not out.exists()
    save_file({"w": w.dequantize().contiguous()}, str(out))
    assert torch.equal(comfy.utils.load_torch_file(str(out))["w"], w.dequantize().cpu())
