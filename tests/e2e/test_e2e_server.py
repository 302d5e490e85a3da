"""End to end: a real ComfyUI server (main.py --cpu on loopback, started and stopped by PID) with
this pack as a custom node and a tiny Wan file in its diffusion_models folder.

Checks /object_info for both nodes and their inputs, then queues loader -> attention node ->
KSampler -> SaveLatent through /prompt for FP8 and MXFP4 and waits on /history. No text encoder
weights exist here, so a test-only custom node in the temporary base dir supplies a random
CONDITIONING of the model's text width (Wan 4096, Z-Image 2560).

Also: the same workflow with LoraLoaderModelOnly on a small LoRA file in
models/loras, on this server and on a second one whose CPU loads go through ComfyUI's lowvram
path, as --lowvram makes them on a small GPU (ComfyUI refuses --lowvram next to --cpu: see
LOWVRAM_NODE); and a Z-Image workflow at the real width 3840 (one main layer plus the 2+2 refiner
blocks, ~0.9 B parameters, a 1.8 GB file written once per module and deleted after).
"""

from __future__ import annotations

import math
import re
import uuid

import helpers_models as hm
import pytest
import torch

from quant.bench.models import ZIMAGE, tiny_config

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

TEST_NODE = """
import torch


class OQTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"tokens": ("INT", {"default": 8}), "seed": ("INT", {"default": 0})},
            "optional": {"width": ("INT", {"default": 4096, "min": 1, "max": 8192})},
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, tokens, seed, width=4096):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, width, generator=g) * 0.5, {}]],)


NODE_CLASS_MAPPINGS = {"OQTestConditioning": OQTestConditioning}
"""

# Written only into the second ("lowvram") server's custom_nodes. ComfyUI 0.8.0 cannot run
# `--lowvram` on a CPU-only machine: argparse rejects it next to --cpu (one mutually exclusive
# group), and without --cpu ComfyUI asks torch.cuda for a device at import. It would change nothing
# on CPU anyway: load_models_gpu sets vram_set_state = DISABLED for a CPU load device, so
# lowvram_model_memory stays 0 and every model is loaded fully (--reserve-vram/--novram likewise).
# What --lowvram does on a small GPU is give ModelPatcher.load a memory budget; this node gives
# CPU loads a budget of 1 byte, so ComfyUI's real lowvram path runs in the server with every
# module offloaded: each Linear gets comfy_cast_weights (its packed weight moved per forward) and
# each LoRA'd one a LowVramPatch, applied per forward to the dequantized weight instead of being
# patched in and requantized at load. (A budget of half the model still loaded every LoRA'd layer
# of this tiny Wan: ModelPatcher.load offloads the largest modules first.)
LOWVRAM_NODE = """
import logging

import comfy.model_management as mm

_orig_model_load = mm.LoadedModel.model_load


def _model_load(self, lowvram_model_memory=0, force_patch_weights=False):
    if lowvram_model_memory == 0 and mm.is_device_cpu(self.device):
        lowvram_model_memory = 1
        logging.info("OQ test: CPU load with lowvram budget %d bytes", lowvram_model_memory)
    return _orig_model_load(self, lowvram_model_memory, force_patch_weights=force_patch_weights)


mm.LoadedModel.model_load = _model_load

NODE_CLASS_MAPPINGS = {}
"""

LORA_NAME = "oq_test_lora.safetensors"
LORA_RANK = 4
# Quantized Linear layers of the tiny Wan (min_out_features 256 keeps all of these quantized),
# in ComfyUI's LoRA key format for Wan ("diffusion_model.<module>.lora_up/lora_down/alpha", as
# comfy.lora.model_lora_keys_unet maps them): FFN in and out, a self- and a cross-attention input.
LORA_LAYERS = {
    "blocks.0.ffn.0": (hm.WAN_FFN, hm.WAN_DIM),
    "blocks.0.ffn.2": (hm.WAN_DIM, hm.WAN_FFN),
    "blocks.1.self_attn.q": (hm.WAN_DIM, hm.WAN_DIM),
    "blocks.1.cross_attn.k": (hm.WAN_DIM, hm.WAN_DIM),
}


def _write_lora(path, layers: dict[str, tuple[int, int]] = LORA_LAYERS) -> None:
    """A LoRA of rank LORA_RANK on `layers` (name -> (out, in) features), ComfyUI's key format."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(21)
    sd = {}
    for name, (n, k) in layers.items():
        sd[f"diffusion_model.{name}.lora_up.weight"] = (torch.randn(n, LORA_RANK, generator=g) * 0.3).to(
            torch.bfloat16
        )
        sd[f"diffusion_model.{name}.lora_down.weight"] = (
            torch.randn(LORA_RANK, k, generator=g) / math.sqrt(k)
        ).to(torch.bfloat16)
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(float(LORA_RANK))
    save_file(sd, str(path))


def server_base(tmp_path_factory, name: str):
    """A server's base folder with the test conditioning node, the tiny Wan and the test LoRA."""
    from comfy_server import make_base_dir

    base = make_base_dir(tmp_path_factory.mktemp(name))
    (base / "custom_nodes" / "oq_test_conditioning.py").write_text(TEST_NODE)
    hm.save_model(hm.wan_model(seed=11), base / "models" / "diffusion_models" / "wan_tiny.safetensors")
    _write_lora(base / "models" / "loras" / LORA_NAME)
    return base


@pytest.fixture(scope="module")
def server(comfyui_path, tmp_path_factory):
    from comfy_server import start_comfy_server

    srv = start_comfy_server(comfyui_path, server_base(tmp_path_factory, "oq_e2e"))
    try:
        yield srv
    finally:
        srv.stop()
    assert not srv.alive()


def test_object_info_lists_nodes_and_inputs(server):
    info = server.get_json("/object_info")
    loader = info.get("OnlineQuantDiffusionLoader")
    assert loader, server.log_tail()
    assert loader["display_name"] == "Load Diffusion Model FP8/MXFP4 (Online Quant)"
    assert loader["category"] == "OnlineQuant"
    req = loader["input"]["required"]
    assert set(req) == {
        "unet_name", "quantization", "ignored_layers", "min_out_features", "compute_dtype", "keep_sensitive"
    }
    assert req["keep_sensitive"][1]["default"] == "none"
    assert (
        "wan_tiny.safetensors" in req["unet_name"][1]["options"]
        or "wan_tiny.safetensors" in req["unet_name"][0]
    )
    quant_opts = req["quantization"][1].get("options") or req["quantization"][0]
    assert {"fp8_e4m3fn", "mxfp4", "none"} <= set(quant_opts)
    assert req["ignored_layers"][1]["multiline"] and req["ignored_layers"][1]["default"].startswith("# auto")
    for name, spec in req.items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    att = info.get("OnlineQuantAttention")
    assert att and att["display_name"] == "Attention Backend (Online Quant)"
    backends = att["input"]["required"]["backend"]
    assert {"auto", "sdpa", "flash_attn_2", "comfy_default"} <= set(backends[1].get("options") or backends[0])


def _sample_and_save(
    model: list, steps: int, prefix: str, cfg: float = 1.0, negative: list | None = None
) -> dict:
    """Nodes "5" (KSampler on latent "3", positive "4", negative `negative` or "4") and "6"
    (SaveLatent) of a test prompt."""
    return {
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "seed": 3,
                "steps": steps,
                "cfg": cfg,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["4", 0],
                "negative": negative or ["4", 0],
                "latent_image": ["3", 0],
                "denoise": 1.0,
            },
        },
        "6": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"},
        },
    }


def _workflow(fmt: str, backend: str, prefix: str, lora: float | None = None) -> dict:
    wf = {
        "1": {
            "class_type": "OnlineQuantDiffusionLoader",
            "inputs": {
                "unet_name": "wan_tiny.safetensors",
                "quantization": fmt,
                "ignored_layers": "# auto\n",
                "min_out_features": 256,
                "compute_dtype": "auto",
                "keep_sensitive": "none",
            },
        },
        "2": {"class_type": "OnlineQuantAttention", "inputs": {"model": ["1", 0], "backend": backend}},
        "3": {
            "class_type": "EmptyHunyuanLatentVideo",
            "inputs": {"width": 64, "height": 64, "length": 1, "batch_size": 1},
        },
        "4": {"class_type": "OQTestConditioning", "inputs": {"tokens": 8, "seed": 1}},
        **_sample_and_save(["2", 0], steps=2, prefix=prefix),
    }
    if lora is not None:
        wf["7"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": LORA_NAME, "strength_model": lora},
        }
        wf["2"]["inputs"]["model"] = ["7", 0]
    return wf


def _latent(server, prefix: str) -> torch.Tensor:
    """The tensor of the one .latent file SaveLatent wrote under output/latents/<prefix>*."""
    from safetensors.torch import load_file

    files = sorted((server.base_dir / "output" / "latents").glob(f"{prefix}_*.latent"))
    assert len(files) == 1, files
    return load_file(str(files[0]))["latent_tensor"].float()


def _run(server, prompt: dict, timeout_s: float = 120.0) -> dict:
    status, body = server.post_json("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert status == 200, f"/prompt -> {status}: {body}"
    entry = server.wait_for(body["prompt_id"], timeout_s)
    if entry["status"].get("status_str") != "success":
        raise AssertionError(f"prompt failed: {entry['status']}\n{server.log_tail()}")
    return entry


@pytest.mark.parametrize("fmt,backend", [("fp8_e4m3fn", "sdpa"), ("mxfp4", "auto")])
def test_workflow_runs_through_prompt_and_history(server, fmt, backend):
    prefix = f"oq_{fmt}"
    entry = _run(server, _workflow(fmt, backend, prefix))
    report = entry["outputs"]["1"]["text"][0]
    assert f"format: {fmt}" in report and "family: wan21" in report and "quantized" in report
    files = list((server.base_dir / "output" / "latents").glob(f"{prefix}*.latent"))
    assert files and files[0].stat().st_size > 0


# --- LoRA: LoraLoaderModelOnly between the loader and the attention node ------------------------


def _lora_latents(server, tag: str) -> dict:
    """{(fmt, strength): saved latent} for the LoRA workflow at strength 1 and 0 (0 = no LoRA:
    LoraLoaderModelOnly passes the model through)."""
    out = {}
    for fmt, backend in (("fp8_e4m3fn", "sdpa"), ("mxfp4", "auto")):
        for strength in (1.0, 0.0):
            prefix = f"{tag}_{fmt}_s{int(strength)}"
            # (the loader's report is in history only when it ran: ComfyUI caches its output)
            _run(server, _workflow(fmt, backend, prefix, lora=strength))
            out[fmt, strength] = _latent(server, prefix)
    return out


@pytest.fixture(scope="module")
def normal_lora_latents(server):
    return _lora_latents(server, "lora")


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
def test_lora_workflow_changes_the_result(normal_lora_latents, fmt):
    y1, y0 = normal_lora_latents[fmt, 1.0], normal_lora_latents[fmt, 0.0]
    assert y1.shape == y0.shape == (1, 16, 1, 8, 8)
    assert torch.isfinite(y1).all() and torch.isfinite(y0).all()
    assert hm.rel_err(y0, y1) > 0.01, hm.rel_err(y0, y1)  # the LoRA had an effect


@pytest.fixture(scope="module")
def lowvram_server(comfyui_path, tmp_path_factory):
    from comfy_server import make_base_dir, start_comfy_server

    base = make_base_dir(tmp_path_factory.mktemp("oq_e2e_lowvram"))
    (base / "custom_nodes" / "oq_test_conditioning.py").write_text(TEST_NODE)
    (base / "custom_nodes" / "oq_test_cpu_lowvram.py").write_text(LOWVRAM_NODE)
    hm.save_model(hm.wan_model(seed=11), base / "models" / "diffusion_models" / "wan_tiny.safetensors")
    _write_lora(base / "models" / "loras" / LORA_NAME)
    srv = start_comfy_server(comfyui_path, base)  # --lowvram: see LOWVRAM_NODE
    try:
        yield srv
    finally:
        srv.stop()
    assert not srv.alive()


LOWVRAM_TOL = {"fp8_e4m3fn": 0.015, "mxfp4": 0.05}


def test_lora_workflow_lowvram_matches_normal(lowvram_server, normal_lora_latents):
    low = _lora_latents(lowvram_server, "lowvram")
    log = lowvram_server.log_text()
    assert "OQ test: CPU load with lowvram budget" in log, lowvram_server.log_tail()
    # ComfyUI's own line: modules offloaded, the 4 LoRA'd ones as LowVramPatch (strength 1 runs)
    patches = [int(n) for n in re.findall(r"loaded partially;.*lowvram patches: (\d+)", log)]
    assert sorted(patches) == [0, 0, len(LORA_LAYERS), len(LORA_LAYERS)], lowvram_server.log_tail()
    for (fmt, strength), y_normal in normal_lora_latents.items():
        y_low = low[fmt, strength]
        assert torch.isfinite(y_low).all(), (fmt, strength)
        err = hm.rel_err(y_normal, y_low)
        if strength == 0.0:  # no LoRA: the same packed bytes, only moved per forward
            assert err < 1e-5, (fmt, err)  # measured: exactly 0
            continue
        # lowvram: dequant(W) + LoRA per forward; normal: W + LoRA requantized at load. They differ
        # by one requantization of the 4 LoRA'd layers (measured: fp8 0.5%, mxfp4 2.1%), while
        # the LoRA itself moves the latent by ~8.5% in both modes.
        assert err < LOWVRAM_TOL[fmt], (fmt, err)
        base = normal_lora_latents[fmt, 0.0]
        effect_normal, effect_low = hm.rel_err(base, y_normal), hm.rel_err(base, y_low)
        assert abs(effect_low - effect_normal) < 0.25 * effect_normal, (fmt, effect_normal, effect_low)


# --- Z-Image at its real width (ComfyUI detects Z-Image only at dim 3840) ---------------------------

ZIMAGE_NAME = "zimage_1layer.safetensors"
# NextDiT with Z-Image's real options as ComfyUI's detector sets them for dim 3840, but n_layers 1
# (detection counts `layers.N`); the 2 noise_refiner + 2 context_refiner blocks always exist.
ZIMAGE_REAL = tiny_config(ZIMAGE, n_layers=1)
# Linear layers of that file: 5 blocks x (attention.qkv, attention.out, feed_forward.w1/w2/w3) are
# quantized; the Z-Image defaults keep x_embedder, cap_embedder.1, t_embedder.mlp.0/.2, the 3
# adaLN_modulation layers (layers.0 and the 2 noise refiners) and final_layer's 2 Linears.
ZIMAGE_QUANTIZED, ZIMAGE_KEPT = 25, 9


def _write_zimage(path, seed: int = 3) -> None:
    """Random bf16 weights with the real key names and shapes (~1.8 GB), built without ever holding
    an fp32 copy: the module is made on the meta device only for its state_dict's names/shapes."""
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT
    from safetensors.torch import save_file

    with torch.device("meta"):
        m = NextDiT(**ZIMAGE_REAL, operations=comfy.ops.disable_weight_init, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in m.state_dict().items():
        t = torch.randn(v.shape, generator=g, dtype=torch.bfloat16)
        if v.dim() >= 2:
            t.mul_(1.0 / math.sqrt(math.prod(v.shape[1:])))
        elif k.endswith("bias"):
            t.mul_(0.02)
        else:  # norm scales, pad tokens
            t.mul_(0.1).add_(1.0)
        sd[k] = t
    del m
    save_file(sd, str(path))


@pytest.fixture(scope="module")
def zimage_file(server):
    path = server.base_dir / "models" / "diffusion_models" / ZIMAGE_NAME
    _write_zimage(path)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _zimage_workflow(fmt: str, prefix: str) -> dict:
    return {
        "1": {
            "class_type": "OnlineQuantDiffusionLoader",
            "inputs": {
                "unet_name": ZIMAGE_NAME,
                "quantization": fmt,
                "ignored_layers": "# auto\n",
                "min_out_features": 256,
                "compute_dtype": "auto",
                "keep_sensitive": "none",
            },
        },
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "OQTestConditioning", "inputs": {"tokens": 8, "seed": 1, "width": 2560}},
        **_sample_and_save(["1", 0], steps=1, prefix=prefix),
    }


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
def test_zimage_workflow_at_real_width(server, zimage_file, fmt):
    prefix = f"zimage_{fmt}"
    entry = _run(server, _zimage_workflow(fmt, prefix), timeout_s=300.0)
    report = entry["outputs"]["1"]["text"][0]
    assert "family: zimage" in report and f"format: {fmt}" in report, report
    assert f"Linear layers: {ZIMAGE_QUANTIZED} quantized, {ZIMAGE_KEPT} kept" in report, report
    y = _latent(server, prefix)
    assert y.shape == (1, 16, 8, 8) and torch.isfinite(y).all()
    assert y.abs().max() > 0


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("ignored_layers", "# auto\n\nre:((", "(line 3)"),
        ("ignored_layers", "# auto\nweight-only: self_attn\n", "(line 2)"),
        ("keep_sensitive", "worst banana", "keep_sensitive"),
    ],
)
def test_queue_refuses_bad_inputs_before_the_run(server, field, value, expected):
    """The loader's input validation refuses the prompt when it is queued, with the message (and
    line) the preview shows; nothing starts."""
    wf = _workflow("fp8_e4m3fn", "auto", "refused")
    wf["1"]["inputs"][field] = value
    status, body = server.post_json("/prompt", {"prompt": wf, "client_id": uuid.uuid4().hex})
    assert status == 400, body
    details = " ".join(e.get("details", "") for e in body["node_errors"]["1"]["errors"])
    assert expected in details, details


def test_a_comment_only_edit_does_not_load_again(server):
    """Editing only a comment of ignored_layers re-runs the loader node (its input changed), which
    then finds the same plan and reuses the live model: no second load, the same latent."""
    marker = "OnlineQuant wan_tiny.safetensors: mxfp4_ocp"
    wf = _workflow("mxfp4_ocp", "sdpa", "oq_reuse_a")
    first = _run(server, wf)
    loads = server.log_text().count(marker)
    assert loads >= 1
    wf2 = _workflow("mxfp4_ocp", "sdpa", "oq_reuse_b")
    wf2["1"]["inputs"]["ignored_layers"] = "# auto\n# only a comment changed\n"
    second = _run(server, wf2)
    assert server.log_text().count(marker) == loads  # not loaded again
    assert "reused it, nothing was loaded again" in second["outputs"]["1"]["text"][0]
    assert "reused" not in first["outputs"]["1"]["text"][0]
    assert torch.equal(_latent(server, "oq_reuse_a"), _latent(server, "oq_reuse_b"))
    wf3 = _workflow("mxfp4_ocp", "sdpa", "oq_reuse_c")
    wf3["1"]["inputs"]["ignored_layers"] = "# auto\nblocks.0.ffn\n"  # a real change: loads again
    _run(server, wf3)
    assert server.log_text().count(marker) == loads + 1
