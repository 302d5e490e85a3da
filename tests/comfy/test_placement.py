"""Where a load keeps its packed weights: on the GPU that made them when the quantized model fits
there twice over (plus ComfyUI's reserve), else on the module's own device (ComfyUI's choice)."""

from __future__ import annotations

import helpers_models as hm
import pytest
import torch

pytestmark = pytest.mark.comfyui

GIB = 1024**3


@pytest.fixture(scope="module")
def placement(pack):
    return hm.import_submodules(pack, "nodes.placement").nodes.placement


def test_packed_weights_stay_on_the_gpu_only_with_room_to_spare(placement):
    choose = placement.choose_packed_device
    gpu = torch.device("cuda", 0)
    assert choose(gpu, 10 * GIB, 40 * GIB, GIB, True)[0] == gpu
    # just under twice the model plus the reserve: ComfyUI would load it partially afterwards
    dev, why = choose(gpu, 10 * GIB, 21 * GIB - 1, GIB, True)
    assert dev is None and "does not fit twice" in why and "10.00 GiB" in why
    dev, why = choose(gpu, GIB, 70 * GIB, GIB, False)
    assert dev is None and "low-VRAM" in why
    assert choose(torch.device("cpu"), GIB, 70 * GIB, GIB, True)[0] is None
    assert choose(None, GIB, 70 * GIB, GIB, True)[0] is None


def test_model_bytes_count_packed_layers_and_everything_else(pack, placement, tmp_path):
    hm.import_submodules(pack, "quant.selection.checkpoint_plan")
    sd = hm.wan_model(seed=3).state_dict()
    plan = pack.quant.selection.checkpoint_plan.plan_checkpoint(
        {k: tuple(v.shape) for k, v in sd.items()}, "fp8_e4m3fn", "", family="wan22_5b", min_out_features=0
    ).plan
    fp8 = placement.quantized_model_bytes(sd, plan)
    plain = sum(v.numel() * v.element_size() for v in sd.values())
    quantized = [d for d in plan.decisions if d.quantize]
    assert quantized
    # each quantized bf16/fp32 weight shrinks to one byte per element plus one fp32 scale per row
    shrink = sum(
        d.out_features * d.in_features * (sd[f"{d.name}.weight"].element_size() - 1) - 4 * d.out_features
        for d in quantized
    )
    assert fp8 == plain - shrink


def test_a_cpu_load_keeps_ComfyUIs_placement(pack, tmp_path):
    mods = hm.import_submodules(pack, "nodes.loader")
    path = hm.save_model(hm.wan_model(seed=3), tmp_path / "wan_tiny.safetensors")
    # quantized on the CPU (on a GPU machine the default would quantize on the GPU and keep the
    # packed weights there when they fit, as test_packed_weights_stay_on_the_gpu_only_with_room_to_spare
    # checks)
    mp, rep = mods.nodes.loader.load_quantized(
        str(path), "fp8_e4m3fn", "", compute_dtype="bf16", quantize_device="cpu"
    )
    q = [m.weight for m in mp.model.diffusion_model.modules() if getattr(m, "_oq_format", None)]
    assert q and all(w.device == mp.offload_device for w in q)
