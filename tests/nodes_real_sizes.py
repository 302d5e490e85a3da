"""Weight bytes before/after at the real model sizes, computed from shapes (not collected by
pytest). ComfyUI's own Z-Image / Wan classes are built on the meta device at full size (no
memory, no weights), their Linear layers listed, and the loader's plan built for each format with
the family defaults and with everything eligible. Prints a markdown table.

    python3 tests/nodes_real_sizes.py        # needs ComfyUI importable (see tests/conftest.py)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("COMFYUI_PATH", str(Path("~/comfy/ComfyUI").expanduser())))
sys.path.insert(0, str(REPO))


def models() -> dict[str, tuple[str, torch.nn.Module]]:
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT
    from comfy.ldm.wan.model import WanModel

    ops = comfy.ops.disable_weight_init
    wan = dict(patch_size=(1, 2, 2), text_len=512, freq_dim=256, text_dim=4096, device="meta", operations=ops)
    zimage = NextDiT(
        patch_size=2, in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
        multiple_of=256, ffn_dim_multiplier=8.0 / 3.0, qk_norm=True, cap_feat_dim=2560,
        axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True,
        time_scale=1000.0,
        pad_tokens_multiple=32, device="meta", operations=ops,
    )  # fmt: skip
    return {
        "Z-Image-Turbo 6B": ("zimage", zimage),
        "Wan 2.1/2.2 A14B (T2V)": (
            "wan21",
            WanModel(
                model_type="t2v",
                in_dim=16,
                dim=5120,
                ffn_dim=13824,
                out_dim=16,
                num_heads=40,
                num_layers=40,
                **wan,
            ),
        ),
        "Wan 2.2 TI2V 5B": (
            "wan22_5b",
            WanModel(
                model_type="t2v",
                in_dim=48,
                dim=3072,
                ffn_dim=14336,
                out_dim=48,
                num_heads=24,
                num_layers=30,
                **wan,
            ),
        ),
    }


def main() -> None:
    from quant.selection import build_plan, linears_from_module

    gib = 2**30
    print(
        "| model | Linear params | format | ignored layers | quantized | bf16 GiB | after GiB | after/bf16 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, (family, module) in models().items():
        layers = linears_from_module(module)
        params = sum(li.out_features * li.in_features for li in layers)
        for fmt in ("fp8_e4m3fn", "mxfp4"):
            for ignore, what in ((None, "family defaults"), ("", "everything eligible")):
                plan = build_plan(layers, fmt, ignore, family)
                b, a = plan.bytes_before(), plan.bytes_after()
                print(
                    f"| {label} | {params / 1e9:.2f} B | {fmt} | {what} "
                    f"| {len(plan.quantized())}/{len(layers)} "
                    f"| {b / gib:.2f} | {a / gib:.2f} | {a / b * 100:.1f}% |"
                )


if __name__ == "__main__":
    main()
