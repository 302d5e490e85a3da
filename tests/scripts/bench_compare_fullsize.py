"""Full-size compare run (a script, not a test): Z-Image at its real width and depth with RANDOM
weights, loaded by ComfyUI unquantized and online-quantized, compared by the compare node's
`compare_models` (per-step denoiser error, final latent error, worst layers).

    python tests/scripts/bench_compare_fullsize.py [--tiny] [--steps 4] [--json out.json]

Needs a real ComfyUI importable (COMFYUI_PATH or ~/comfy/ComfyUI or ./.carry/ComfyUI) and,
at full size, a GPU with ~40 GB free. `--tiny` runs the same code on the 2-layer test model
(CPU, seconds). The weights are random (std 1/sqrt(fan_in)); the numbers show how the formats
and ignore lists compare on this architecture, not the quality on the real checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "support"))


def _comfy_path() -> Path:
    carried = HERE.parents[1] / ".carry" / "ComfyUI"
    for p in (os.environ.get("COMFYUI_PATH"), carried, Path("~/comfy/ComfyUI").expanduser()):
        if p and (Path(p) / "comfy" / "ops.py").is_file():
            return Path(p)
    raise SystemExit("no ComfyUI found (set COMFYUI_PATH)")


def _stub_pyav() -> None:
    """ComfyUI's comfy_api imports PyAV (video files) at import time; the GPU test image has no
    PyAV and nothing here reads or writes video, so an inert stand-in is enough."""
    try:
        import av  # noqa: F401
    except ImportError:
        import types

        class _Any:
            def __init__(self, *a, **k):
                pass

        def getattr_(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Any

        def mod(name: str) -> types.ModuleType:
            m = types.ModuleType(name)
            m.__getattr__ = getattr_  # type: ignore[method-assign]
            sys.modules[name] = m
            return m

        for n in ("av", "av.container", "av.subtitles", "av.subtitles.stream"):
            mod(n)
        print("note: PyAV missing, stubbed (no video I/O in this script)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--configs", default="fp8_e4m3fn:default,fp8_e4m3fn:all,mxfp4:default,mxfp4:all")
    ap.add_argument("--activation-stats", action="store_true")
    a = ap.parse_args(argv)

    sys.path.insert(0, str(_comfy_path()))
    _stub_pyav()
    import comfy.cli_args
    import torch

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.ops
    import comfy.sd
    import conftest
    import helpers_models as hm

    pack = conftest.import_pack()
    hm.import_submodules(pack, "nodes.compare", "nodes.ops", "quant.selection.plan", "quant.models")
    from comfyui_online_quant.nodes.compare import compare_models
    from comfyui_online_quant.nodes.ops import make_ops
    from comfyui_online_quant.quant.models import detect_family
    from comfyui_online_quant.quant.selection import build_plan, linears_from_shapes

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    log = {"device": name, "torch": torch.__version__}
    t0 = time.perf_counter()

    # ---- random full-size (or tiny) Z-Image state dict, real key names -----------------------
    from comfy.ldm.lumina.model import NextDiT

    if a.tiny:
        cfg = dict(hm.ZIMAGE_CONFIG)
        ctx = hm.zimage_detection
        cap_dim, hw = hm.ZIMAGE_CAP, 16
    else:  # ComfyUI's detection of the real file (model_detection.py, dim 3840)
        cfg = dict(
            patch_size=2, in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
            n_kv_heads=30, multiple_of=256, ffn_dim_multiplier=8.0 / 3.0, qk_norm=True, cap_feat_dim=2560,
            axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True,
            time_scale=1000.0, pad_tokens_multiple=32,
        )
        ctx = contextlib.nullcontext
        cap_dim, hw = 2560, 128  # 1024x1024 image
    with torch.device("meta"):
        meta = NextDiT(**cfg, operations=comfy.ops.disable_weight_init, dtype=torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    sd = {}
    for k, p in meta.state_dict().items():
        if p.dim() >= 2:
            t = torch.randn(p.shape, generator=g, device=dev) / math.sqrt(math.prod(p.shape[1:]))
        elif k.endswith("bias"):
            t = torch.randn(p.shape, generator=g, device=dev) * 0.02
        else:
            t = 1.0 + torch.randn(p.shape, generator=g, device=dev) * 0.1
        sd[k] = t.to(torch.bfloat16)
    del meta
    n_params = sum(v.numel() for v in sd.values())
    log["params"] = n_params
    log["build_s"] = round(time.perf_counter() - t0, 1)
    print(f"state dict: {n_params / 1e9:.2f} B params on {dev} in {log['build_s']} s", flush=True)

    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    layers = linears_from_shapes(shapes)
    family = detect_family(list(shapes), shapes) if not a.tiny else "zimage"

    def load(fmt: str | None, ignore: str | None):
        opts = {"dtype": torch.bfloat16}
        plan = None
        if fmt:
            plan = build_plan(layers, fmt, ignore, family)
            opts["custom_operations"] = make_ops(plan, fmt, torch.bfloat16, quantize_device=dev)
        t = time.perf_counter()
        with ctx():
            m = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=opts)
        return m, plan, time.perf_counter() - t

    ref, _, t_ref = load(None, None)
    print(f"reference loaded in {t_ref:.1f} s", flush=True)
    g2 = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 64, cap_dim, generator=g2), {}]]
    neg = [[torch.randn(1, 64, cap_dim, generator=g2), {}]]
    latent = {"samples": torch.zeros(1, 16, hw, hw)}
    results = []
    for i, spec in enumerate(a.configs.split(",")):
        fmt, which = spec.split(":")
        q, plan, t_load = load(fmt, None if which == "default" else "")
        res, _, _ = compare_models(
            q, ref, pos, neg, latent, seed=0, steps=a.steps, cfg=1.0, sampler_name="euler",
            scheduler="simple", teacher_forced=True, worst_layers=5,
            activation_stats=a.activation_stats and i == 0,
        )
        row = {
            "format": fmt,
            "ignore": which,
            "layers_quantized": len(plan.quantized()),
            "layers_kept": len(plan.kept()),
            "linear_gib_after": round(plan.bytes_after() / 2**30, 2),
            "linear_gib_before": round(plan.bytes_before() / 2**30, 2),
            "load_s": round(t_load, 1),
            "ref_sampling_s": round(res.seconds_reference, 2),
            "q_sampling_s": round(res.seconds_quantized, 2),
            "teacher_sqnr_db": [round(s.teacher_sqnr_db, 2) for s in res.steps],
            "trajectory_sqnr_db": [round(s.trajectory_sqnr_db, 2) for s in res.steps],
            "latent_sqnr_db": round(res.latent_sqnr_db, 2),
            "latent_rel_l2": round(res.latent_rel_l2, 4),
            "worst_layers": {n: round(res.layer_sqnr[n], 2) for n in res.worst_layers},
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        if res.activation_table:
            print(res.activation_table, flush=True)
        del q
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
    log["results"] = results
    log["total_s"] = round(time.perf_counter() - t0, 1)
    if a.json:
        Path(a.json).write_text(json.dumps(log, indent=1))
    print(f"total {log['total_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
