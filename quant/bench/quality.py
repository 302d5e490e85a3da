"""Per-layer-family quantization error at the real layer shapes, with random weights.

    python -m quant.bench.quality                 # Z-Image, Wan 2.2 5B, Wan 14B at full size (CPU, minutes)
    python -m quant.bench.quality --quick         # tiny shapes, seconds (what the tests run)
    python -m quant.bench.quality --md q.md --json q.json
    python -m quant.bench.quality --ablation      # model level: which layer family moves the output
    python -m quant.bench.quality --overhead      # what the load report's per-layer SQNR costs

For one representative Linear of each layer family of each model (published shapes, at FULL
size), it draws random weights and activations, one layer at a time (nothing else is held), and
measures for every weight format / granularity / rounding:
- weight SQNR (dB) and the worst output channel's SQNR (a per-tensor scale hurts small rows);
- Linear output SQNR (dB) against fp32 for W8A16, W8A8 (FP8, per-token activations), W4A16 and
  W4A4 (MXFP4, activations with AITER's rounding), on Gaussian activations and on activations
  with a few outlier channels (x20..x100).
Then it picks, per layer family, the MXFP4 scale rounding and the FP8 granularity by those
numbers. Weights are RANDOM (N(0, 0.02), and a "structured" profile with per-row/column scale
spread and rare large weights): the numbers rank formats on these distributions; they are not
measurements on the real checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..quality import fake_quantize_activation, fake_quantize_weight, sqnr_db

FP8_VARIANTS = ("fp8_channel", "fp8_tensor")
MXFP4_VARIANTS = ("mxfp4_even", "mxfp4_floor", "mxfp4_ceil")
WEIGHT_PROFILES = ("normal", "structured")
ACT_PROFILES = ("normal", "outliers")


@dataclass(frozen=True)
class LayerSpec:
    model: str
    family: str  # qkv, attn_out, cross_attn, ffn_up, ffn_down, modulation, embedder, time_embed, head
    name: str  # one real layer of the family (ComfyUI's name, no prefix)
    out_features: int
    in_features: int
    count: int  # Linear layers of this family and shape in the model


def _zimage(dim=3840, ffn=10240, layers=30, mod=256, cap=2560, patch=64) -> tuple[LayerSpec, ...]:
    blocks = layers + 4  # + 2 noise_refiner + 2 context_refiner
    return (
        LayerSpec("zimage", "qkv", "layers.0.attention.qkv", 3 * dim, dim, blocks),
        LayerSpec("zimage", "attn_out", "layers.0.attention.out", dim, dim, blocks),
        LayerSpec("zimage", "ffn_up", "layers.0.feed_forward.w1", ffn, dim, 2 * blocks),
        LayerSpec("zimage", "ffn_down", "layers.0.feed_forward.w2", dim, ffn, blocks),
        LayerSpec("zimage", "modulation", "layers.0.adaLN_modulation.0", 4 * dim, mod, layers + 2),
        LayerSpec("zimage", "embedder", "cap_embedder.1", dim, cap, 1),
        LayerSpec("zimage", "embedder", "x_embedder", dim, patch, 1),
        LayerSpec("zimage", "time_embed", "t_embedder.mlp.0", min(dim, 1024), 256, 1),
        LayerSpec("zimage", "head", "final_layer.linear", patch, dim, 1),
    )


def _wan(model: str, dim: int, ffn: int, blocks: int, head_out: int, text=4096, freq=256):
    return (
        LayerSpec(model, "qkv", "blocks.0.self_attn.q", dim, dim, 3 * blocks),
        LayerSpec(model, "attn_out", "blocks.0.self_attn.o", dim, dim, 2 * blocks),
        LayerSpec(model, "cross_attn", "blocks.0.cross_attn.k", dim, dim, 3 * blocks),
        LayerSpec(model, "ffn_up", "blocks.0.ffn.0", ffn, dim, blocks),
        LayerSpec(model, "ffn_down", "blocks.0.ffn.2", dim, ffn, blocks),
        LayerSpec(model, "modulation", "time_projection.1", 6 * dim, dim, 1),
        LayerSpec(model, "embedder", "text_embedding.0", dim, text, 1),
        LayerSpec(model, "time_embed", "time_embedding.0", dim, freq, 1),
        LayerSpec(model, "head", "head.head", head_out, dim, 1),
    )


MODELS: dict[str, tuple[LayerSpec, ...]] = {
    "zimage": _zimage(),
    "wan22_5b": _wan("wan22_5b", 3072, 14336, 30, 192),
    "wan21_14b": _wan("wan21_14b", 5120, 13824, 40, 64),
}
# CI scale: same families and layer names, tiny widths (all K multiples of 32).
QUICK_MODELS: dict[str, tuple[LayerSpec, ...]] = {
    "zimage": _zimage(dim=128, ffn=352, layers=2, mod=64, cap=96, patch=64),
    "wan22_5b": _wan("wan22_5b", 128, 384, 2, 192, text=96, freq=64),
}


def make_weight(spec: LayerSpec, profile: str, gen: torch.Generator) -> torch.Tensor:
    """Random [out, in] fp32 weight. "normal": N(0, 0.02). "structured": the same times a
    log-normal scale per output row and per input column (sigma 0.5 each) with 0.05% of the
    weights x10, which is closer to trained layers (uneven rows, a few large weights)."""
    n, k = spec.out_features, spec.in_features
    w = torch.randn(n, k, generator=gen).mul_(0.02)
    if profile == "structured":
        w.mul_(torch.randn(n, 1, generator=gen).mul_(0.5).exp_())
        w.mul_(torch.randn(1, k, generator=gen).mul_(0.5).exp_())
        hits = torch.randint(0, n * k, (max(1, n * k // 2000),), generator=gen)
        w.view(-1)[hits] *= 10.0
    elif profile != "normal":
        raise ValueError(f"unknown weight profile {profile!r}; known: {WEIGHT_PROFILES}")
    return w


def make_activation(tokens: int, k: int, profile: str, gen: torch.Generator) -> torch.Tensor:
    """Random [tokens, k] activations. "outliers": N(0, 1) with max(2, k // 512) channels scaled
    x20 .. x100 (the massive-activation channels DiT and LLM text-encoder inputs show)."""
    x = torch.randn(tokens, k, generator=gen)
    if profile == "outliers":
        n_out = max(2, k // 512)
        idx = torch.randperm(k, generator=gen)[:n_out]
        x[:, idx] *= torch.linspace(20.0, 100.0, n_out)
    elif profile != "normal":
        raise ValueError(f"unknown activation profile {profile!r}; known: {ACT_PROFILES}")
    return x


def _min_row_sqnr(w: torch.Tensor, wq: torch.Tensor) -> float:
    d = w - wq
    s = (w * w).sum(1)
    e = (d * d).sum(1)
    ok = e > 0
    if not bool(ok.any()):
        return math.inf
    return float((10.0 * torch.log10(s[ok] / e[ok])).min())


def sample_rows(n: int, rows: int) -> torch.Tensor:
    """Evenly spaced output-channel indices (all of them when n <= rows)."""
    if n <= rows:
        return torch.arange(n)
    return torch.linspace(0, n - 1, rows).round().long()


def measure_layer(
    spec: LayerSpec,
    w: torch.Tensor,
    acts: dict[str, torch.Tensor],
    xq: dict[tuple[str, int], torch.Tensor],
    rows: int = 512,
) -> dict:
    """All numbers for one full-size weight: {variant: {weight_sqnr_db, min_channel_sqnr_db,
    out: {"W8A16/normal": dB, ...}}}. `xq` caches quantized activations by (profile, bits).

    Every format here is row-local (per-channel FP8 scales, MXFP4 blocks along K), so errors are
    measured exactly on a sample of `rows` output channels of the full weight; per-tensor FP8 gets
    the full tensor's amax by quantizing the sample together with the row that holds it."""
    idx = sample_rows(w.shape[0], rows)
    ws = w.index_select(0, idx)
    amax_row = w.abs().amax(dim=1).argmax().reshape(1)
    mx_ok = spec.in_features % 32 == 0
    refs = {p: x @ ws.t() for p, x in acts.items()}
    res: dict[str, dict] = {}
    for variant in FP8_VARIANTS + (MXFP4_VARIANTS if mx_ok else ()):
        if variant == "fp8_tensor":
            wq = fake_quantize_weight(torch.cat([ws, w.index_select(0, amax_row)]), variant)[:-1]
        else:
            wq = fake_quantize_weight(ws, variant)
        bits = 8 if variant.startswith("fp8") else 4
        entry = {
            "weight_sqnr_db": sqnr_db(ws, wq),
            "min_channel_sqnr_db": _min_row_sqnr(ws, wq),
            "out": {},
        }
        for p, x in acts.items():
            entry["out"][f"W{bits}A16/{p}"] = sqnr_db(refs[p], x @ wq.t())
            entry["out"][f"W{bits}A{bits}/{p}"] = sqnr_db(refs[p], xq[(p, bits)] @ wq.t())
        res[variant] = entry
        del wq
    return res


def run(
    models: Sequence[str],
    *,
    quick: bool = False,
    tokens: int = 256,
    seed: int = 0,
    weight_profiles: Sequence[str] = WEIGHT_PROFILES,
    rows: int = 512,
    progress: Callable[[str], None] | None = None,
) -> dict:
    table = QUICK_MODELS if quick else MODELS
    unknown = [m for m in models if m not in table]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(table)}")
    results = []
    t0 = time.perf_counter()
    for m in models:
        for spec in table[m]:
            # crc32, not hash(): str hashes change per process and the bench must be reproducible
            gen = torch.Generator().manual_seed(seed + zlib.crc32(f"{spec.model}/{spec.name}".encode()))
            acts = {p: make_activation(tokens, spec.in_features, p, gen) for p in ACT_PROFILES}
            xq = {(p, 8): fake_quantize_activation(x, 8) for p, x in acts.items()}
            if spec.in_features % 32 == 0:
                xq.update({(p, 4): fake_quantize_activation(x, 4) for p, x in acts.items()})
            for wp in weight_profiles:
                t = time.perf_counter()
                w = make_weight(spec, wp, gen)
                res = measure_layer(spec, w, acts, xq, rows)
                del w
                results.append({**asdict(spec), "weight_profile": wp, "results": res})
                if progress:
                    progress(
                        f"{spec.model:10s} {spec.name:32s} {spec.out_features}x{spec.in_features} "
                        f"{wp:10s} {time.perf_counter() - t:5.1f} s"
                    )
    return {
        "config": {
            "models": list(models),
            "quick": quick,
            "tokens": tokens,
            "rows": rows,
            "seed": seed,
            "weight_profiles": list(weight_profiles),
            "activation_profiles": list(ACT_PROFILES),
            "torch": torch.__version__,
            "device": "cpu",
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "rows": results,
        "shares": param_shares(models, quick=quick),
        "defaults": choose_defaults(results),
    }


def param_shares(models: Sequence[str], *, quick: bool = False) -> dict[str, dict[str, float]]:
    """Share of each model's Linear parameters per layer family (what keeping it bf16 costs),
    from the representative shapes times their counts (families listed here only)."""
    table = QUICK_MODELS if quick else MODELS
    out = {}
    for m in models:
        per: dict[str, int] = {}
        for s in table[m]:
            per[s.family] = per.get(s.family, 0) + s.out_features * s.in_features * s.count
        total = sum(per.values())
        out[m] = {f: v / total for f, v in per.items()}
    return out


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


# Tie margins (dB): below them the choice stays with the format's existing default, because
# "even" is bit-compatible with AITER's activation quantizer and "channel" is already the default.
MXFP4_MARGIN_DB = 0.05
FP8_MARGIN_DB = 0.1


def choose_defaults(rows: Sequence[dict]) -> dict[str, dict]:
    """Per layer family: the MXFP4 rounding with the best mean W4A16 + W4A4 output SQNR (all models,
    weight and activation profiles), and FP8 granularity by W8A8 output SQNR and worst-channel
    weight SQNR. Returns {family: {"mxfp4_rounding", "fp8_granularity", "evidence": {...}}}."""
    fams: dict[str, list[dict]] = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(r)
    out = {}
    for fam, rs in fams.items():
        mx = {}
        for v in MXFP4_VARIANTS:
            outs = [r["results"][v]["out"] for r in rs if v in r["results"]]
            mx[v] = _mean([x for o in outs for k, x in o.items() if k.startswith("W4")])
        best_mx = "mxfp4_even"
        if all(math.isfinite(x) for x in mx.values()) and mx:
            top = max(mx, key=mx.get)
            if mx[top] > mx["mxfp4_even"] + MXFP4_MARGIN_DB:
                best_mx = top
        fp8 = {}
        for v in FP8_VARIANTS:
            outs = [r["results"][v]["out"] for r in rs]
            fp8[v] = {
                "w8a8_out_db": _mean([x for o in outs for k, x in o.items() if k.startswith("W8A8")]),
                "min_channel_db": _mean([r["results"][v]["min_channel_sqnr_db"] for r in rs]),
            }
        gain_out = fp8["fp8_channel"]["w8a8_out_db"] - fp8["fp8_tensor"]["w8a8_out_db"]
        gain_ch = fp8["fp8_channel"]["min_channel_db"] - fp8["fp8_tensor"]["min_channel_db"]
        gran = "tensor" if gain_out < FP8_MARGIN_DB and gain_ch < FP8_MARGIN_DB else "channel"
        out[fam] = {
            "mxfp4_rounding": best_mx.split("_", 1)[1] if mx else "n/a",
            "fp8_granularity": gran,
            "evidence": {
                "mxfp4_mean_out_db": {k: round(v, 3) for k, v in mx.items()},
                "fp8_channel_gain_out_db": round(gain_out, 3),
                "fp8_channel_gain_min_channel_db": round(gain_ch, 3),
            },
        }
    return out


def _f(x: float) -> str:
    return "inf" if x == math.inf else ("n/a" if not math.isfinite(x) else f"{x:.1f}")


def to_markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "## Quantization error per layer family (random weights, real shapes)",
        "",
        f"`python -m quant.bench.quality{' --quick' if cfg['quick'] else ''}` — torch {cfg['torch']}, CPU, "
        f"{cfg['tokens']} tokens x {cfg['rows']} sampled output channels per full-size layer, "
        f"seed {cfg['seed']}, {cfg['seconds']} s. RANDOM weights "
        "(normal: N(0, 0.02); structured: + log-normal row/column scales and rare x10 weights) and "
        "activations (normal: N(0,1); outliers: a few channels x20..x100). Output SQNR in dB vs fp32 "
        "(higher is better; 20 dB = 10% relative L2, 30 dB = 3.2%). Columns W8 use FP8 e4m3fn "
        "per-channel weights; W8A8 quantizes activations per token. W4 columns use MXFP4 with the "
        "rounding named; W4A4 quantizes activations with AITER's rounding.",
        "",
    ]
    hdr = (
        "| model | layer | shape | weights | FP8 ch / tensor wSQNR (worst ch) | W8A16 | W8A8 | W8A8 outl. "
        "| MXFP4 even / floor / ceil wSQNR | W4A16 even | W4A4 even | W4A4 outl. even / floor / ceil |"
    )
    lines += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in result["rows"]:
        res = r["results"]
        c, t = res["fp8_channel"], res["fp8_tensor"]
        fp8w = (
            f"{_f(c['weight_sqnr_db'])} ({_f(c['min_channel_sqnr_db'])}) / "
            f"{_f(t['weight_sqnr_db'])} ({_f(t['min_channel_sqnr_db'])})"
        )
        if "mxfp4_even" in res:
            e, fl, ce = res["mxfp4_even"], res["mxfp4_floor"], res["mxfp4_ceil"]
            mxw = " / ".join(_f(v["weight_sqnr_db"]) for v in (e, fl, ce))
            w4a16 = _f(e["out"]["W4A16/normal"])
            w4a4 = _f(e["out"]["W4A4/normal"])
            w4o = " / ".join(_f(v["out"]["W4A4/outliers"]) for v in (e, fl, ce))
        else:
            mxw = w4a16 = w4a4 = w4o = "K%32≠0"
        shape = f"{r['out_features']}x{r['in_features']}"
        lines.append(
            f"| {r['model']} | {r['name']} | {shape} | {r['weight_profile']} | "
            f"{fp8w} | {_f(c['out']['W8A16/normal'])} | {_f(c['out']['W8A8/normal'])} | "
            f"{_f(c['out']['W8A8/outliers'])} | {mxw} | {w4a16} | {w4a4} | {w4o} |"
        )
    lines += ["", "### Share of Linear parameters per family", ""]
    fams = sorted({f for v in result["shares"].values() for f in v})
    lines.append("| model | " + " | ".join(fams) + " |")
    lines.append("|---|" + "---|" * len(fams))
    for m, sh in result["shares"].items():
        lines.append(f"| {m} | " + " | ".join(f"{sh.get(f, 0) * 100:.2f}%" for f in fams) + " |")
    lines += [
        "",
        "### Chosen per family (by the numbers above)",
        "",
        "| family | MXFP4 rounding | mean W4 out dB even / floor / ceil | FP8 granularity | channel gain: W8A8 out dB, worst channel dB |",  # noqa: E501
        "|---|---|---|---|---|",
    ]
    for fam, d in result["defaults"].items():
        ev = d["evidence"]
        mx = " / ".join(_f(ev["mxfp4_mean_out_db"].get(v, math.nan)) for v in MXFP4_VARIANTS)
        lines.append(
            f"| {fam} | {d['mxfp4_rounding']} | {mx} | {d['fp8_granularity']} | "
            f"{ev['fp8_channel_gain_out_db']:+.2f}, {ev['fp8_channel_gain_min_channel_db']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Model-level ablation: which layer family's quantization moves the model output
# ---------------------------------------------------------------------------------------------

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
    from ..models import default_ignore_text
    from ..selection.patterns import PatternSet, parse_patterns
    from .toy_model import ToyZImage, build_toy_zimage, toy_inputs

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
                        handles.append(lins[n].register_forward_pre_hook(
                            lambda mod, args, b=bits: (fake_quantize_activation(args[0], b),)
                        ))
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
        vals = " | ".join(_f(d[s]) for s in schemes)
        lines.append(f"| {g} | {d['params_share'] * 100:.2f}% | {vals} |")
    return "\n".join(lines) + "\n"


def sqnr_overhead(out_features: int = 13824, in_features: int = 5120, repeats: int = 3) -> str:
    """What measuring a layer's weight SQNR costs next to quantizing it (CPU, bf16 weight of a
    Wan 14B ffn.0 by default): full dequantize + compare vs the row-sampled measurement the load
    report uses (quality.quantized_weight_sqnr_db, 256 rows). Best of `repeats` runs."""
    from ..formats import get_format
    from ..quality import quantized_weight_sqnr_db, weight_sqnr_db

    def best(fn):
        ts, r = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            r = fn()
            ts.append(time.perf_counter() - t)
        return min(ts), r

    w = (torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    lines = [
        f"`python -m quant.bench.quality --overhead` — weight [{out_features}x{in_features}] bf16, CPU, "
        f"{torch.get_num_threads()} threads, best of {repeats}",
        "",
        "| format | quantize | full dequantize + SQNR | sampled SQNR (256 rows) | SQNR full / sampled |",
        "|---|---|---|---|---|",
    ]
    for name in ("fp8_e4m3fn", "mxfp4"):
        fmt = get_format(name)
        tq, qw = best(lambda fmt=fmt: fmt.quantize(w))
        tf, sf = best(lambda fmt=fmt, qw=qw: weight_sqnr_db(w, fmt.dequantize(qw, torch.bfloat16)))
        ts, ss = best(lambda qw=qw: quantized_weight_sqnr_db(w, qw, rows=256))
        lines.append(
            f"| {name} | {tq * 1000:.0f} ms | {tf * 1000:.0f} ms ({tf / tq:.0%}) | "
            f"{ts * 1000:.1f} ms ({ts / tq:.1%}) | {sf:.2f} / {ss:.2f} dB |"
        )
    return "\n".join(lines) + "\n"


def _json_safe(x):
    """inf/nan are not JSON: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quant.bench.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CI): seconds instead of minutes")
    ap.add_argument("--models", default=None, help="zimage,wan22_5b,wan21_14b (default: all)")
    ap.add_argument("--tokens", type=int, default=None, help="rows per layer (default 256, quick 32)")
    ap.add_argument("--rows", type=int, default=512, help="output channels measured per layer (default 512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default=",".join(WEIGHT_PROFILES), help="weight profiles: normal,structured")
    ap.add_argument("--json", default=None, help="write the full results as JSON here")
    ap.add_argument("--md", default=None, help="write the Markdown tables here (default: stdout)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--ablation", action="store_true", help="model-level ablation per layer family instead")
    ap.add_argument("--overhead", action="store_true", help="cost of the per-layer SQNR instead")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.overhead:
        print(sqnr_overhead())
        return 0
    if a.ablation:
        res = ablation(quick=a.quick, seed=a.seed, progress=lambda s: print(s, file=sys.stderr, flush=True))
        _write_outputs(ablation_markdown(res), res, a.md, a.json)
        return 0
    table = QUICK_MODELS if a.quick else MODELS
    models = a.models.split(",") if a.models else list(table)
    tokens = a.tokens or (32 if a.quick else 256)
    try:
        result = run(
            models,
            quick=a.quick,
            tokens=tokens,
            seed=a.seed,
            rows=a.rows,
            weight_profiles=[w for w in a.weights.split(",") if w],
            progress=lambda s: print(s, file=sys.stderr, flush=True),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _write_outputs(to_markdown(result), result, a.md, a.json)
    return 0


def _write_outputs(md: str, result, md_path: str | None, json_path: str | None) -> None:
    """The Markdown tables to `md_path` (stdout when None), the full results as JSON to `json_path`."""
    if md_path:
        with open(md_path, "w") as f:
            f.write(md)
    else:
        print(md)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(_json_safe(result), f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
