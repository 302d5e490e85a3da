"""Model output error of online-quantized loads against the bf16 load (not collected by pytest).

Small Z-Image and Wan models built with ComfyUI's classes (random weights, N(0, 1/fan_in)),
saved as safetensors, loaded through `load_quantized` for each format, with the family defaults
and with everything eligible; one forward with fixed random inputs; relative L2 error of the
output against the bf16 load. Runs on the CPU (reference matmul: weight-only, w8a16 / w4a16) or
on CUDA (the backend `auto` picks, e.g. FP8 W8A8 via _scaled_mm). Prints a markdown table.

    python3 tests/scripts/nodes_output_errors.py [--dim 1024] [--layers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, os.environ.get("COMFYUI_PATH", str(Path("~/comfy/ComfyUI").expanduser())))
sys.path.insert(0, str(REPO / "tests" / "support"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    import comfy.model_management as mm
    import comfy.ops
    import helpers_models as hm
    from comfy.ldm.lumina.model import NextDiT
    from comfy.ldm.wan.model import WanModel
    from gpu_nodes_check import _pack

    pack = _pack()
    dim, n = args.dim, args.layers
    dev = mm.get_torch_device()
    ops = comfy.ops.disable_weight_init
    tmp = Path(tempfile.mkdtemp())
    g = torch.Generator().manual_seed(1)

    wan = WanModel(
        model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=dim, ffn_dim=4 * dim,
        freq_dim=256, text_dim=4096, out_dim=16, num_heads=dim // 128, num_layers=n, operations=ops,
        dtype=torch.float32,
    )  # fmt: skip
    zcfg = dict(
        hm.ZIMAGE_CONFIG, dim=dim, n_heads=dim // 128, n_kv_heads=dim // 128, n_layers=n, cap_feat_dim=dim
    )
    zimage = NextDiT(**zcfg, operations=ops, dtype=torch.float32)
    cases = {
        "wan21": (wan, {
            "x": torch.randn(1, 16, 2, 16, 16, generator=g),
            "timestep": torch.tensor([500.0]),
            "context": torch.randn(1, 32, 4096, generator=g) * 0.5,
        }),
        "zimage": (zimage, {
            "x": torch.randn(1, 16, 32, 32, generator=g),
            "timesteps": torch.tensor([0.5]),
            "context": torch.randn(1, 32, dim, generator=g) * 0.5,
            "num_tokens": 32,
        }),
    }  # fmt: skip
    print(f"device {dev}; dim {dim}, {n} blocks; rel. L2 error of the output vs the bf16 load")
    print("| family | format | ignored layers | quantized/Linear | backend | rel. error |")
    print("|---|---|---|---|---|---|")
    for family, (module, inp) in cases.items():
        hm._init_random_(module, 0)
        path = str(hm.save_model(module, tmp / f"{family}.safetensors"))
        inp32 = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in inp.items()}
        inp = {k: (_bf16(v).to(dev) if torch.is_tensor(v) else v) for k, v in inp.items()}

        def run(mp, inp=inp):
            mm.load_models_gpu([mp])
            with torch.no_grad():
                out = mp.model.diffusion_model(**inp, transformer_options={}).float()
            mm.unload_all_models()
            return out

        ctx = hm.zimage_detection() if family == "zimage" else _null()
        with ctx:
            ref = run(pack.nodes.loader.load_quantized(path, "none", None, compute_dtype="bf16")[0])
            # the model's own sensitivity: the bf16 load against an fp32 load of the same file
            ref32 = run(pack.nodes.loader.load_quantized(path, "none", None, compute_dtype="fp32")[0], inp32)
            print(f"| {family} | none (bf16 vs fp32) | - | - | - | {hm.rel_err(ref32, ref):.4f} |")
            for fmt in ("fp8_e4m3fn", "mxfp4"):
                for ignore, what in ((None, "family defaults"), ("", "everything eligible")):
                    mp, rep = pack.nodes.loader.load_quantized(
                        path, fmt, ignore, compute_dtype="bf16", family=family
                    )
                    err = hm.rel_err(ref, run(mp))
                    print(
                        f"| {family} | {fmt} | {what} | {len(rep.quantized())}/{len(rep.layers)} "
                        f"| {rep.backend} | {err:.4f} |"
                    )


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16() if t.dim() > 1 else t


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    main()
