"""End to end: a real ComfyUI server (main.py --cpu on loopback, started and stopped by PID) with
this pack as a custom node and a tiny Wan file in its diffusion_models folder.

Checks /object_info for both nodes and their inputs, then queues loader -> attention node ->
KSampler -> SaveLatent through /prompt for FP8 and MXFP4 and waits on /history. No text encoder
weights exist here, so a test-only custom node in the temporary base dir supplies a random
CONDITIONING of Wan's text width (4096)."""

from __future__ import annotations

import time
import uuid

import helpers_models as hm
import pytest

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

TEST_NODE = """
import torch


class OQTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": ("INT", {"default": 8}), "seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, tokens, seed):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, 4096, generator=g) * 0.5, {}]],)


NODE_CLASS_MAPPINGS = {"OQTestConditioning": OQTestConditioning}
"""


@pytest.fixture(scope="module")
def server(comfyui_path, tmp_path_factory):
    from comfy_server import make_base_dir, start_comfy_server

    base = make_base_dir(tmp_path_factory.mktemp("oq_e2e"))
    (base / "custom_nodes" / "oq_test_conditioning.py").write_text(TEST_NODE)
    hm.save_model(hm.wan_model(seed=11), base / "models" / "diffusion_models" / "wan_tiny.safetensors")
    srv = start_comfy_server(comfyui_path, base)
    try:
        yield srv
    finally:
        srv.stop()
    assert not srv.alive()


def test_object_info_lists_nodes_and_inputs(server):
    info = server.get_json("/object_info")
    loader = info.get("OnlineQuantDiffusionLoader")
    assert loader, server.log_tail()
    assert loader["display_name"] == "Load Diffusion Model (Online Quant)"
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


def _workflow(fmt: str, backend: str, prefix: str) -> dict:
    return {
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
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0],
                "seed": 3,
                "steps": 2,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["4", 0],
                "negative": ["4", 0],
                "latent_image": ["3", 0],
                "denoise": 1.0,
            },
        },
        "6": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"},
        },
    }


def _run(server, prompt: dict, timeout_s: float = 120.0) -> dict:
    status, body = server.post_json("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert status == 200, f"/prompt -> {status}: {body}"
    pid = body["prompt_id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hist = server.get_json(f"/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
            entry = hist[pid]
            if entry["status"].get("status_str") == "success":
                return entry
            raise AssertionError(f"prompt failed: {entry['status']}\n{server.log_tail()}")
        assert server.alive(), server.log_tail()
        time.sleep(0.5)
    raise AssertionError(f"prompt {pid} did not finish in {timeout_s}s\n{server.log_tail()}")


@pytest.mark.parametrize("fmt,backend", [("fp8_e4m3fn", "sdpa"), ("mxfp4", "auto")])
def test_workflow_runs_through_prompt_and_history(server, fmt, backend):
    prefix = f"oq_{fmt}"
    entry = _run(server, _workflow(fmt, backend, prefix))
    report = entry["outputs"]["1"]["text"][0]
    assert f"format: {fmt}" in report and "family: wan21" in report and "quantized" in report
    files = list((server.base_dir / "output" / "latents").glob(f"{prefix}*.latent"))
    assert files and files[0].stat().st_size > 0
