"""Weight bytes before/after at the real model sizes, computed from shapes (not collected by
pytest). ComfyUI's own Z-Image / Wan classes are built on the meta device at full size (no
memory, no weights), their Linear layers listed, and the loader's plan built for each format with
the family defaults and with everything eligible. Prints a markdown table.

    python3 tests/scripts/nodes_real_sizes.py        # needs ComfyUI importable (see tests/conftest.py)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, os.environ.get("COMFYUI_PATH", str(Path("~/comfy/ComfyUI").expanduser())))
sys.path.insert(0, str(REPO))


def models() -> dict[str, tuple[str, torch.nn.Module]]:
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT
    from comfy.ldm.wan.model import WanModel

    from quant.bench.models import WAN5B, WAN14B, ZIMAGE  # the real configs, in one place

    meta = dict(device="meta", operations=comfy.ops.disable_weight_init)
    return {
        "Z-Image-Turbo 6B": ("zimage", NextDiT(**ZIMAGE, **meta)),
        "Wan 2.1/2.2 A14B (T2V)": ("wan21", WanModel(**WAN14B, **meta)),
        "Wan 2.2 TI2V 5B": ("wan22_5b", WanModel(**WAN5B, **meta)),
    }


def main() -> None:
    from quant.selection.layers import linears_from_module
    from quant.selection.plan import build_plan

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
