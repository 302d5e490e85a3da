"""End to end through a real ComfyUI server (main.py --cpu): Save Quantized Model (Online Quant).

- loader -> (LoRA) -> Save Quantized writes a packed file into output/diffusion_models whose
  packed bytes are the quantized source weights; moved to models/diffusion_models, the pack's
  loader reads it without quantizing (its report says so) and samples the same latent, bit for
  bit, as the model that was saved (with its LoRA applied);
- stock ComfyUI's "Load Diffusion Model" (UNETLoader) refuses an MXFP4 or per-channel FP8 file
  when it loads it, naming the pack's loader, and loads a per-tensor FP8 file correctly.
"""

from __future__ import annotations

import json
import uuid

import helpers_models as hm
import pytest
import torch
from safetensors import safe_open
from test_e2e_server import LORA_NAME, _latent, _run, _sample_and_save, server_base

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

SOURCE = "wan_tiny.safetensors"


@pytest.fixture(scope="module")
def server(comfyui_path, tmp_path_factory):
    from comfy_server import start_comfy_server

    srv = start_comfy_server(comfyui_path, server_base(tmp_path_factory, "oq_save"))
    try:
        yield srv
    finally:
        srv.stop()


def _loader(unet: str, fmt: str) -> dict:
    return {
        "class_type": "OnlineQuantDiffusionLoader",
        "inputs": {
            "unet_name": unet,
            "quantization": fmt,
            "ignored_layers": "# auto\n",
            "min_out_features": 256,
            "compute_dtype": "auto",
            "keep_sensitive": "none",
        },
    }


def _sampling(loader: dict, prefix: str, lora: bool = False) -> dict:
    wf = {
        "1": loader,
        "3": {
            "class_type": "EmptyHunyuanLatentVideo",
            "inputs": {"width": 64, "height": 64, "length": 1, "batch_size": 1},
        },
        "4": {"class_type": "OQTestConditioning", "inputs": {"tokens": 8, "seed": 1}},
        **_sample_and_save(["7" if lora else "1", 0], steps=2, prefix=prefix),
    }
    if lora:
        wf["7"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": LORA_NAME, "strength_model": 1.0},
        }
    return wf


def _save_packed(server, fmt: str, name: str, lora: bool = False) -> tuple[str, str]:
    """Run loader -> (LoRA) -> sampler and loader -> (LoRA) -> Save Quantized in one prompt; move
    the saved file to models/diffusion_models/<name>. -> (the node's summary, the latent's prefix)."""
    wf = _sampling(_loader(SOURCE, fmt), f"src_{name}", lora)
    wf["9"] = {
        "class_type": "OnlineQuantSaveQuantized",
        "inputs": {"model": ["7" if lora else "1", 0], "filename_prefix": f"diffusion_models/{name}"},
    }
    entry = _run(server, wf)
    (saved,) = sorted((server.base_dir / "output" / "diffusion_models").glob(f"{name}_*.safetensors"))
    saved.rename(server.models_dir / "diffusion_models" / f"{name}.safetensors")
    return entry["outputs"]["9"]["text"][0], f"src_{name}"


def _run_fails(server, prompt: dict) -> dict:
    """Queue a prompt that must fail while it runs; -> ComfyUI's execution_error data."""
    import time

    status, body = server.post_json("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert status == 200, body
    pid = body["prompt_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        hist = server.get_json(f"/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
            st = hist[pid]["status"]
            assert st["status_str"] == "error", st
            return next(data for kind, data in st["messages"] if kind == "execution_error")
        time.sleep(0.5)
    raise AssertionError(f"prompt {pid} did not finish\n{server.log_tail()}")


def _stock(unet: str, prefix: str) -> dict:
    return _sampling(
        {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}}, prefix
    )


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
def test_saved_file_loads_in_the_pack_without_quantizing_and_samples_the_same(server, fmt):
    name = f"oq_packed_{fmt}"
    summary, src_prefix = _save_packed(server, fmt, name)
    assert (
        summary.startswith(f"saved diffusion_models/{name}_00001_.safetensors: ") and f"as {fmt}" in summary
    )
    path = server.models_dir / "diffusion_models" / f"{name}.safetensors"
    # the packed bytes are the source weights quantized (the same CPU quantizer the server ran)
    from quant.formats import get_format

    with (
        safe_open(str(path), "pt") as f,
        safe_open(str(server.models_dir / "diffusion_models" / SOURCE), "pt") as s,
    ):
        layers = json.loads(f.metadata()["online_quant.layers"])
        assert layers and all(v["format"] == fmt for v in layers.values())
        for layer in layers:
            qw = get_format(fmt).quantize(s.get_tensor(f"{layer}.weight"))
            assert torch.equal(f.get_tensor(f"{layer}.weight").view(torch.uint8), qw.qdata.view(torch.uint8))
            assert torch.equal(f.get_tensor(f"{layer}.weight_scale"), qw.scale)

    entry = _run(server, _sampling(_loader(path.name, fmt), f"packed_{name}"))
    report = entry["outputs"]["1"]["text"][0]
    assert f"loaded pre-quantized (format {fmt}, file format version 1) — no quantization" in report
    assert "WARNING" not in report
    assert torch.equal(_latent(server, f"packed_{name}"), _latent(server, src_prefix))


def test_lora_is_saved_applied(server):
    name = "oq_packed_lora"
    _, src_prefix = _save_packed(server, "fp8_e4m3fn", name, lora=True)
    _run(server, _sampling(_loader(f"{name}.safetensors", "fp8_e4m3fn"), f"packed_{name}"))
    _run(server, _sampling(_loader(SOURCE, "fp8_e4m3fn"), "no_lora"))
    y = _latent(server, f"packed_{name}")
    assert torch.equal(y, _latent(server, src_prefix))  # the LoRA'd model's latent, from the file alone
    assert hm.rel_err(_latent(server, "no_lora"), y) > 1e-3


@pytest.mark.parametrize("fmt", ["mxfp4", "fp8_e4m3fn"])
def test_stock_loader_refuses_a_format_it_cannot_read(server, fmt):
    name = f"oq_stock_{fmt}"
    _save_packed(server, fmt, name)
    err = _run_fails(server, _stock(f"{name}.safetensors", f"stock_{name}"))
    assert err["node_type"] == "UNETLoader" and err["exception_type"] == "KeyError"
    assert "saved by ComfyUI-OnlineQuant" in err["exception_message"]
    assert (
        "load this file with the 'Load Diffusion Model FP8/MXFP4 (Online Quant)' node"
        in err["exception_message"]
    )
    assert not list((server.base_dir / "output" / "latents").glob(f"stock_{name}_*"))


def test_stock_loader_loads_a_per_tensor_fp8_file_correctly(server):
    name = "oq_stock_tensor"
    _, src_prefix = _save_packed(server, "fp8_e4m3fn_tensor", name)
    _run(server, _stock(f"{name}.safetensors", f"stock_{name}"))
    _run(server, _stock(SOURCE, "stock_bf16"))
    y = _latent(server, f"stock_{name}")
    assert torch.isfinite(y).all()
    assert hm.rel_err(_latent(server, src_prefix), y) < 0.05  # the pack's model of the same file
    assert hm.rel_err(_latent(server, "stock_bf16"), y) < 0.1


def test_node_is_listed_with_its_help_page(server):
    info = server.get_json("/object_info/OnlineQuantSaveQuantized")["OnlineQuantSaveQuantized"]
    assert info["display_name"] == "Save Quantized Model (Online Quant)"
    assert info["output_node"] is True and info["category"] == "OnlineQuant"
    assert info["input"]["required"]["filename_prefix"][1]["default"] == "diffusion_models/OnlineQuant"
    status, body = server.request("/extensions/ComfyUI-OnlineQuant/docs/OnlineQuantSaveQuantized.md")
    assert status == 200 and body.startswith(b"# Save Quantized Model (Online Quant)")


def test_quantized_cache_through_the_node(server):
    """The loader's quantized_cache: the first load writes models/online_quant_cache/<file>, a load by
    another loader node of the same file and plan reads it (no quantization), the same latent."""
    loader = _loader(SOURCE, "mxfp4")
    loader["inputs"]["quantized_cache"] = True
    first = _run(server, _sampling(loader, "cache_first"))
    assert "quantized cache: miss; wrote wan_tiny-" in first["outputs"]["1"]["text"][0]
    (cached,) = (server.models_dir / "online_quant_cache").glob("wan_tiny-*.safetensors")
    wf = _sampling(loader, "cache_second")
    # another node with a comment-only edit: ComfyUI runs it (its inputs changed) and the loader
    # cannot reuse the first node's live model, so this is a real second load of the same plan
    wf["11"] = wf.pop("1")
    wf["11"]["inputs"]["ignored_layers"] = "# auto\n# a comment\n"
    wf["5"]["inputs"]["model"] = ["11", 0]
    second = _run(server, wf)
    assert f"quantized cache: read {cached.name} — no quantization" in second["outputs"]["11"]["text"][0]
    assert torch.equal(_latent(server, "cache_first"), _latent(server, "cache_second"))
