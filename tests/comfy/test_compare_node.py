"""The compare node in a real ComfyUI (imported through the fixtures) on the tiny Wan / Z-Image
models of tests/support/helpers_models.py: per-step errors, final latent, decoded-image metrics,
worst layers, activation statistics, and the node's V3 schema / execute path."""

from __future__ import annotations

import math

import helpers_models as hm
import pytest
import torch

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def mods(pack):
    hm.import_submodules(pack, "nodes.loader", "nodes.compare", "nodes.layouts", "nodes.ops", "quant.quality")
    return pack.nodes


@pytest.fixture(scope="module")
def wan_pair(mods, tmp_path_factory):
    path = hm.save_model(hm.wan_model(seed=0), tmp_path_factory.mktemp("cmp") / "wan_tiny.safetensors")
    ref, _ = mods.loader.load_quantized(str(path), "none", None, compute_dtype="bf16")
    q8, _ = mods.loader.load_quantized(str(path), "fp8_e4m3fn", "", compute_dtype="bf16")
    q4, _ = mods.loader.load_quantized(str(path), "mxfp4", "", compute_dtype="bf16")
    return ref, q8, q4


def _wan_cond(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 12, 4096, generator=g) * 0.5, {}]]


def _latent():
    return {"samples": torch.zeros(1, 16, 1, 8, 8)}


class _FakeVAE:
    """Stands in for a VAE: a fixed smooth map latent -> [B, H, W, 3] images in [0, 1]."""

    def decode(self, z):
        z = z.float()
        if z.dim() == 5:
            z = z[:, :, 0]
        img = torch.sigmoid(z[:, :3]).movedim(1, -1)
        return torch.nn.functional.interpolate(img.movedim(-1, 1), scale_factor=4).movedim(1, -1)


def test_compare_fp8_vs_mxfp4_per_step_and_images(mods, wan_pair):
    ref, q8, q4 = wan_pair
    kw = dict(seed=3, steps=2, cfg=2.0, sampler_name="euler", scheduler="simple", vae=_FakeVAE())
    r8, lat8, lat_ref = mods.compare.compare_models(q8, ref, _wan_cond(1), _wan_cond(2), _latent(), **kw)
    r4, _, _ = mods.compare.compare_models(q4, ref, _wan_cond(1), _wan_cond(2), _latent(), **kw)
    assert len(r8.steps) == 2 and [s.index for s in r8.steps] == [0, 1]
    assert r8.steps[0].sigma > r8.steps[-1].sigma
    for s in r8.steps:
        assert math.isfinite(s.trajectory_sqnr_db) and s.teacher_sqnr_db is not None
        assert s.trajectory_rel_l2 == pytest.approx(10 ** (-s.trajectory_sqnr_db / 20), rel=1e-3)
    # first evaluation: both runs see the same input, so trajectory == teacher-forced
    assert r8.steps[0].trajectory_sqnr_db == pytest.approx(r8.steps[0].teacher_sqnr_db, abs=1e-3)
    # FP8 is closer to bf16 than MXFP4, per step and on the final result
    assert r8.steps[0].teacher_sqnr_db > r4.steps[0].teacher_sqnr_db
    assert r8.latent_sqnr_db > r4.latent_sqnr_db
    assert r8.image_psnr_db > r4.image_psnr_db and 0 < r4.image_ssim <= r8.image_ssim <= 1
    assert r8.images == 1
    assert lat8["samples"].shape == lat_ref["samples"].shape == (1, 16, 1, 8, 8)
    # worst layers: real quantized layer names with their SQNR, pasteable as ignore lines
    assert r8.worst_layers and all(n in r8.layer_sqnr for n in r8.worst_layers)
    assert r8.layer_sqnr[r8.worst_layers[0]] == min(r8.layer_sqnr.values())
    text = r8.to_text()
    assert "teacher-forced" in text and "PSNR" in text and r8.worst_layers[0] in text


def test_compare_identical_models_is_exact(mods, wan_pair):
    ref, _, _ = wan_pair
    r, _, _ = mods.compare.compare_models(
        ref, ref, _wan_cond(1), _wan_cond(2), _latent(), steps=1, teacher_forced=False, worst_layers=5
    )
    assert all(s.trajectory_sqnr_db == math.inf for s in r.steps)
    assert r.latent_sqnr_db == math.inf and r.latent_rel_l2 == 0.0
    assert r.layer_sqnr == {} and any("no quantized Linear" in n for n in r.notes)


def test_compare_activation_stats_and_hooks_removed(mods, wan_pair):
    ref, q8, _ = wan_pair
    r, _, _ = mods.compare.compare_models(
        q8, ref, _wan_cond(1), _wan_cond(2), _latent(), steps=1, activation_stats=True, worst_layers=0
    )
    assert "activation statistics" in r.activation_table and "w4a4" in r.activation_table
    lin = ref.model.diffusion_model.blocks[0].ffn[0]
    assert not lin._forward_pre_hooks  # the collector's hooks are gone after the run


def test_node_schema_and_execute(mods, pack, wan_pair):
    ref, q8, _ = wan_pair
    node = mods.compare.OnlineQuantCompare
    schema = node.define_schema()
    assert schema.node_id == "OnlineQuantCompare"
    ids = [i.id for i in schema.inputs]
    assert ids[:5] == ["model", "reference_model", "positive", "negative", "latent_image"]
    assert all(getattr(i, "tooltip", None) for i in schema.inputs)
    from comfyui_online_quant.nodes import node_list

    assert node in node_list()
    out = node.execute(q8, ref, _wan_cond(1), _wan_cond(2), _latent(), 0, 1, 1.0, "euler", "simple",
                       True, False, 3)
    text = out.result[0]
    assert text.startswith("OnlineQuant compare") and "final latent" in text
    assert out.result[1]["samples"].shape == (1, 16, 1, 8, 8)


def test_compare_node_served_by_real_comfyui(comfy_server):
    """The running server (main.py --cpu, pack in custom_nodes) lists the node with its inputs."""
    info = comfy_server.get_json("/object_info/OnlineQuantCompare")["OnlineQuantCompare"]
    assert info["display_name"] == "Compare Models (Online Quant)"
    assert info["category"] == "OnlineQuant"
    req = info["input"]["required"]
    assert {"model", "reference_model", "positive", "negative", "latent_image", "seed", "steps"} <= set(req)
    assert req["model"][0] == "MODEL" and req["latent_image"][0] == "LATENT"
    assert "vae" in info["input"]["optional"]
    assert info["output"] == ["STRING", "LATENT", "LATENT"]
