"""Manual GPU check of the nodes (not collected by pytest): a Wan built with ComfyUI's classes
at a small width (random weights), loaded through `load_quantized` on CUDA for each format;
prints the backend chosen, output error vs the bf16 load, model_size, one forward's time, LoRA
and the attention node's `auto`. Run on a CUDA machine with ComfyUI importable:

    COMFYUI_PATH=/path/to/ComfyUI python3 tests/scripts/gpu_nodes_check.py
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, os.environ.get("COMFYUI_PATH", str(Path("~/comfy/ComfyUI").expanduser())))
sys.path.insert(0, str(REPO / "tests" / "support"))


def _pack():
    spec = importlib.util.spec_from_file_location(
        "comfyui_online_quant", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_online_quant"] = mod
    spec.loader.exec_module(mod)
    for sub in ("nodes.loader", "nodes.attention", "nodes.layouts"):
        importlib.import_module(f"comfyui_online_quant.{sub}")
    return mod


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, reps: int = 3) -> tuple[torch.Tensor, float]:
    out = fn()
    _sync()
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    _sync()
    return out, (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    import comfy.model_management as mm
    import comfy.ops
    import comfy.sd
    import helpers_models as hm
    from comfy.ldm.wan.model import WanModel

    pack = _pack()
    dim, layers = int(os.environ.get("CHECK_DIM", 1024)), 4
    ffn = 4 * dim
    m = WanModel(
        model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=dim, ffn_dim=ffn, freq_dim=256,
        text_dim=4096, out_dim=16, num_heads=dim // 128, num_layers=layers,
        operations=comfy.ops.disable_weight_init, dtype=torch.float32,
    )  # fmt: skip
    hm._init_random_(m, 0)
    tmp = Path(tempfile.mkdtemp())
    path = str(hm.save_model(m, tmp / "wan_gpu.safetensors"))
    del m
    dev = mm.get_torch_device()
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {dev}: {name}, torch {torch.__version__}; Wan dim {dim}, {layers} blocks")
    g = torch.Generator().manual_seed(1)
    inp = {
        "x": torch.randn(1, 16, 4, 32, 32, generator=g).bfloat16().to(dev),
        "timestep": torch.tensor([500.0], device=dev),
        "context": (torch.randn(1, 64, 4096, generator=g) * 0.5).bfloat16().to(dev),
    }

    def run(patcher):
        mm.load_models_gpu([patcher])
        topts = patcher.model_options.get("transformer_options", {})
        with torch.no_grad():
            return _timed(
                lambda: patcher.model.diffusion_model(**inp, transformer_options=dict(topts)).float()
            )

    loader = pack.nodes.loader
    ref_mp, _ = loader.load_quantized(path, "none", None, compute_dtype="bf16")
    ref, ref_ms = run(ref_mp)
    print(f"bf16: model_size {ref_mp.model_size() / 2**20:.1f} MiB, forward {ref_ms:.2f} ms")
    mm.unload_all_models()
    for fmt, ignore in (("fp8_e4m3fn", ""), ("fp8_e4m3fn", None), ("mxfp4", ""), ("mxfp4", None)):
        t0 = time.perf_counter()
        mp, rep = loader.load_quantized(path, fmt, ignore, compute_dtype="bf16")
        load_s = time.perf_counter() - t0
        out, ms = run(mp)
        label = "all eligible" if ignore == "" else "family defaults"
        print(
            f"{fmt} ({label}): backend {rep.backend} [{rep.backend_reason}] "
            f"quantized {len(rep.quantized())}, "
            f"kept {len(rep.kept())}; rel err vs bf16 {hm.rel_err(ref, out):.4f}; "
            f"model_size {mp.model_size() / 2**20:.1f} MiB; load {load_s:.2f} s "
            f"(quantize {rep.quantize_seconds:.2f} s on {rep.quantize_device}); forward {ms:.2f} ms; "
            f"sqnr {rep.sqnr_summary()}"
        )
        mm.unload_all_models()
    # LoRA (full load on the GPU) on the FP8 model, and the attention node's auto choice
    mp, _ = loader.load_quantized(path, "fp8_e4m3fn", "", compute_dtype="bf16")
    base, _ = run(mp)
    mm.unload_all_models()
    lora = {}
    for name, (n, k) in {"blocks.0.ffn.0": (ffn, dim), "blocks.1.self_attn.q": (dim, dim)}.items():
        lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(n, 8, generator=g) * 0.05
        lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(8, k, generator=g) * 0.05
    ml, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    out, ms = run(ml)
    w = ml.model.diffusion_model.blocks[0].ffn[0].weight
    print(
        f"LoRA fp8: effect {hm.rel_err(base, out):.4f}, weight still packed: {type(w).__name__} on {w.device}"
    )
    mm.unload_all_models()
    am, name, reason = pack.nodes.attention.apply_attention_backend(mp, "auto")
    out, ms = run(am)
    print(
        f"attention auto -> {name} ({reason}): rel diff vs default {hm.rel_err(base, out):.5f}, "
        f"forward {ms:.2f} ms"
    )


if __name__ == "__main__":
    main()
