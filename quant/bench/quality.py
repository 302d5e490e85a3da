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
from dataclasses import asdict

import torch

from ..formats import get_format
from ..quality import (
    fake_quantize_activation,
    fake_quantize_weight,
    quantized_weight_sqnr_db,
    sample_rows,
    sqnr_db,
    weight_sqnr_db,
)
from .ablation import ablation, ablation_markdown
from .quality_inputs import (
    ACT_PROFILES,
    MODELS,
    QUICK_MODELS,
    WEIGHT_PROFILES,
    LayerSpec,
    make_activation,
    make_weight,
)
from .report import fmt_db

FP8_VARIANTS = ("fp8_channel", "fp8_tensor")
MXFP4_VARIANTS = ("mxfp4_even", "mxfp4_floor", "mxfp4_ceil")


def _min_row_sqnr(w: torch.Tensor, wq: torch.Tensor) -> float:
    d = w - wq
    s = (w * w).sum(1)
    e = (d * d).sum(1)
    ok = e > 0
    if not bool(ok.any()):
        return math.inf
    return float((10.0 * torch.log10(s[ok] / e[ok])).min())


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
    ws = w if idx is None else w.index_select(0, idx)
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
            f"{fmt_db(c['weight_sqnr_db'])} ({fmt_db(c['min_channel_sqnr_db'])}) / "
            f"{fmt_db(t['weight_sqnr_db'])} ({fmt_db(t['min_channel_sqnr_db'])})"
        )
        if "mxfp4_even" in res:
            e, fl, ce = res["mxfp4_even"], res["mxfp4_floor"], res["mxfp4_ceil"]
            mxw = " / ".join(fmt_db(v["weight_sqnr_db"]) for v in (e, fl, ce))
            w4a16 = fmt_db(e["out"]["W4A16/normal"])
            w4a4 = fmt_db(e["out"]["W4A4/normal"])
            w4o = " / ".join(fmt_db(v["out"]["W4A4/outliers"]) for v in (e, fl, ce))
        else:
            mxw = w4a16 = w4a4 = w4o = "K%32≠0"
        shape = f"{r['out_features']}x{r['in_features']}"
        lines.append(
            f"| {r['model']} | {r['name']} | {shape} | {r['weight_profile']} | "
            f"{fp8w} | {fmt_db(c['out']['W8A16/normal'])} | {fmt_db(c['out']['W8A8/normal'])} | "
            f"{fmt_db(c['out']['W8A8/outliers'])} | {mxw} | {w4a16} | {w4a4} | {w4o} |"
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
        mx = " / ".join(fmt_db(ev["mxfp4_mean_out_db"].get(v, math.nan)) for v in MXFP4_VARIANTS)
        lines.append(
            f"| {fam} | {d['mxfp4_rounding']} | {mx} | {d['fp8_granularity']} | "
            f"{ev['fp8_channel_gain_out_db']:+.2f}, {ev['fp8_channel_gain_min_channel_db']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def sqnr_overhead(out_features: int = 13824, in_features: int = 5120, repeats: int = 3) -> str:
    """What measuring a layer's weight SQNR costs next to quantizing it (CPU, bf16 weight of a
    Wan 14B ffn.0 by default): full dequantize + compare vs the row-sampled measurement the load
    report uses (quality.quantized_weight_sqnr_db, 256 rows). Best of `repeats` runs."""

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
    ap.add_argument("--models", default=None, help="zimage,wan22_5b,wan21_t2v_14b (default: all)")
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
