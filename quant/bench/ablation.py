"""Model-level ablation (`python -m quant.bench.quality --ablation`): which layer family's
quantization moves the output of the toy Z-Image (real width and layer names, random weights)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..models import default_ignore_text
from ..quality import fake_quantize_activation, fake_quantize_weight, sqnr_db
from ..selection.patterns import PatternSet, parse_patterns
from .report import fmt_db
from .toy_model import ToyZImage, build_toy_zimage, toy_inputs

# Z-Image layer families by name (ComfyUI's names; the toy model uses the same ones).
ABLATION_GROUPS = {
    "x_embedder": ("x_embedder",),
    "cap_embedder": ("cap_embedder",),
    "t_embedder": ("t_embedder",),
    "adaLN_modulation": ("adaLN_modulation",),
    "final_layer": ("final_layer",),
    "attention.qkv": ("attention.qkv",),
    "attention.out": ("attention.out",),
    "feed_forward": ("feed_forward",),
}
ABLATION_SCHEMES = {"FP8 W8A8": ("fp8_channel", 8), "MXFP4 W4A16": ("mxfp4_even", None)}


def _in_group(name: str, parts: Sequence[str]) -> bool:
    segs = "." + name + "."
    return any("." + p + "." in segs for p in parts)


def ablation(*, quick: bool = False, seed: int = 0, progress: Callable[[str], None] | None = None) -> dict:
    """Output SQNR (dB) of a Z-Image-architecture model (quant/bench/toy_model.py: real width 3840
    and layer names, 1 block + 1 noise/context refiner; `quick`: width 256) against fp32 when
    ONLY one layer family is quantized, when all but the family's default ignore list are, and
    when everything is. Caption features carry outlier channels (x20..x100), as text-encoder
    states do. Random weights N(0, 1/fan_in)."""
    torch.manual_seed(seed)
    if quick:
        model = ToyZImage(layers=1, refiners=1, dim=256, heads=2, ffn=512, cap_dim=2560).eval()
        for p in model.parameters():
            with torch.no_grad():
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]) if p.dim() == 2 else torch.ones_like(p))
    else:
        model = build_toy_zimage(layers=1, refiners=1, seed=seed, dtype=torch.float32)
    lat, t, cap = toy_inputs(seed=seed + 1, size=16, caption_tokens=32)
    gen = torch.Generator().manual_seed(seed + 2)
    idx = torch.randperm(cap.shape[-1], generator=gen)[:4]
    cap[..., idx] *= torch.linspace(20.0, 100.0, 4)
    lins = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    orig = {n: m.weight.detach().clone() for n, m in lins.items()}
    with torch.no_grad():
        ref = model(lat, t, cap).float()
    defaults = PatternSet(parse_patterns(default_ignore_text("zimage")))
    groups = {k: [n for n in lins if _in_group(n, v)] for k, v in ABLATION_GROUPS.items()}
    groups["all but defaults"] = [n for n in lins if not defaults.match(n)]
    groups["all"] = list(lins)
    out: dict[str, dict[str, float]] = {}
    for scheme, (variant, bits) in ABLATION_SCHEMES.items():
        cache: dict[str, torch.Tensor] = {}
        for g, names in groups.items():
            handles = []
            with torch.no_grad():
                for n in names:
                    if n not in cache:
                        cache[n] = fake_quantize_weight(orig[n], variant)
                    lins[n].weight.copy_(cache[n])
                    if bits:
                        handles.append(
                            lins[n].register_forward_pre_hook(
                                lambda mod, args, b=bits: (fake_quantize_activation(args[0], b),)
                            )
                        )
                y = model(lat, t, cap).float()
                for h in handles:
                    h.remove()
                for n in names:
                    lins[n].weight.copy_(orig[n])
            share = sum(orig[n].numel() for n in names) / sum(w.numel() for w in orig.values())
            out.setdefault(g, {"params_share": share})[scheme] = sqnr_db(ref, y)
            if progress:
                progress(f"ablation {scheme:12s} {g:18s} {out[g][scheme]:6.1f} dB")
    return {"quick": quick, "groups": out}


def ablation_markdown(res: dict) -> str:
    schemes = list(ABLATION_SCHEMES)
    lines = [
        "### Model-level: output SQNR when only some layers are quantized (Z-Image architecture)",
        "",
        f"`python -m quant.bench.quality --ablation{' --quick' if res['quick'] else ''}` — the toy Z-Image "
        "(real width and names, 1 block + 1+1 refiners, random weights), caption features with 4 outlier "
        "channels x20..x100; SQNR of the model output vs fp32 (higher is better).",
        "",
        "| quantized | share of Linear params | " + " | ".join(schemes) + " |",
        "|---|---|" + "---|" * len(schemes),
    ]
    for g, d in res["groups"].items():
        vals = " | ".join(fmt_db(d[s]) for s in schemes)
        lines.append(f"| {g} | {d['params_share'] * 100:.2f}% | {vals} |")
    return "\n".join(lines) + "\n"
