"""``python -m quant``: the embedded default run and ``plan`` for a checkpoint.

- ``python -m quant`` (= ``python -m quant demo``): a deterministic toy Z-Image (real width
  3840 and ComfyUI's NextDiT layer names, 1 layer, no refiners by default, seeded random weights) is
  planned with the Z-Image defaults, quantized to FP8 and to MXFP4; prints the plan, bytes
  before/after, output error of each format against bf16, and the time taken. Uses a GPU when
  there is one (``--device`` to choose).
- ``python -m quant plan FILE.safetensors --format mxfp4 --ignore TEXT|@file`` prints the plan
  of a checkpoint from its header only; ``--measure`` streams the weights one tensor at a time
  and adds each quantized layer's weight SQNR (dB). ``--reference zimage`` plans a full-size
  model from its known layer shapes without any file.

User errors (bad pattern, unreadable file, unknown format) print one message and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence

import torch

from .errors import OnlineQuantError
from .models import default_ignore_text, describe_model, detect_family, family_choices, get_family
from .selection.plan import (
    LinearInfo,
    QuantPlan,
    build_plan,
    compact_names,
    linears_from_module,
    linears_from_shapes,
)
from .selection.user_text import plan_from_text

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake in the command line or its inputs: printed without a traceback, exit 2."""


# --- demo -----------------------------------------------------------------------------------------


class _QuantLinear(torch.nn.Module):
    """Stand-in for a quantized nn.Linear in the toy model (the ComfyUI layout lives in nodes/)."""

    def __init__(self, qw, bias: torch.Tensor | None, compute: str):
        super().__init__()
        self.qw, self.bias, self.compute = qw, bias, compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .matmul.linear import quantized_linear

        return quantized_linear(x, self.qw, self.bias, self.compute)


def _swap(model: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    setattr(owner, child, new)
    return old


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name!r}: this PyTorch has no CUDA device")
    return dev


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def run_demo(args: argparse.Namespace, out=print) -> dict:
    """The embedded default. Returns the numbers it printed (tests and notes use them)."""
    from . import quality
    from .bench.toy_model import build_toy_zimage, toy_inputs
    from .formats import get_format
    from .matmul.registry import choose_backend
    from .selection.plan import reference_linears

    t_start = time.perf_counter()
    device = _pick_device(args.device)
    formats = [get_format(f).name for f in args.formats.split(",") if f.strip()]
    where = f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    if device.type == "cpu":
        where += f", {torch.get_num_threads()} threads"
    out(
        f"toy Z-Image: width 3840, ComfyUI NextDiT layer names, {args.layers} layer(s) + "
        f"{args.refiners}+{args.refiners} refiners, random weights (seed {args.seed}), bf16 on {where}"
    )
    t0 = time.perf_counter()
    model = build_toy_zimage(layers=args.layers, refiners=args.refiners, seed=args.seed).to(device)
    inputs = toy_inputs(
        seed=args.seed + 1, size=args.latent, caption_tokens=args.caption_tokens, device=device
    )
    _sync(device)
    t_build = time.perf_counter() - t0
    layers = linears_from_module(model)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = model(*inputs).float()
        _sync(device)
        t_ref = time.perf_counter() - t0
    out(f"built in {t_build:.1f} s; bf16 forward {t_ref:.2f} s, output {tuple(ref.shape)}")

    full = reference_linears("zimage")
    results = {"device": where, "formats": {}, "build_s": t_build, "bf16_forward_s": t_ref}
    for i, fmt_name in enumerate(formats):
        plan = build_plan(layers, fmt_name, None, family="zimage", min_out_features=args.min_out)
        full_plan = build_plan(full, fmt_name, None, family="zimage", min_out_features=args.min_out)
        if i == 0:
            out("")
            out(
                f"plan for full-size Z-Image ({len(full)} Linear layers, shapes of the published configs), "
                "default ignore list:"
            )
            out(_indent(full_plan.summary()))
            out("")
            out(
                f"toy model plan: quantize {len(plan.quantized())} of {len(plan.decisions)} Linear layers "
                f"(same defaults: kept {', '.join(compact_names([d.name for d in plan.kept()]))})"
            )
        choice = choose_backend(fmt_name, device, args.compute)
        originals = {}
        t0 = time.perf_counter()
        fmt = get_format(fmt_name)
        with torch.no_grad():
            for d in plan.quantized():
                lin = model.get_submodule(d.name)
                qw = fmt.quantize(lin.weight)
                originals[d.name] = _swap(model, d.name, _QuantLinear(qw, lin.bias, args.compute))
            _sync(device)
            t_q = time.perf_counter() - t0
            t0 = time.perf_counter()
            y = model(*inputs).float()
            _sync(device)
            t_f = time.perf_counter() - t0
        for name, lin in originals.items():
            _swap(model, name, lin)
        rel = quality.relative_l2(ref, y)
        sqnr = quality.sqnr_db(ref, y)
        r = {
            "plan_quantized": len(plan.quantized()),
            "plan_kept": len(plan.kept()),
            "bytes_before": plan.bytes_before(),
            "bytes_after": plan.bytes_after(),
            "full_size_bytes_before": full_plan.bytes_before(),
            "full_size_bytes_after": full_plan.bytes_after(),
            "quantize_s": t_q,
            "forward_s": t_f,
            "relative_l2": rel,
            "sqnr_db": sqnr,
            "backend": choice.name,
            "compute": choice.compute,
        }
        results["formats"][fmt_name] = r
        out("")
        out(f"{fmt_name}: backend {choice.name} ({choice.compute}: {choice.reason})")
        out(
            f"  Linear weights, toy:       {_fmt_bytes(r['bytes_before'])} -> {_fmt_bytes(r['bytes_after'])} "
            f"({100 * r['bytes_after'] / r['bytes_before']:.1f}%)"
        )
        out(
            f"  Linear weights, full-size Z-Image ({len(full)} layers): "
            f"{_fmt_bytes(r['full_size_bytes_before'])} "
            f"-> {_fmt_bytes(r['full_size_bytes_after'])} "
            f"({100 * r['full_size_bytes_after'] / r['full_size_bytes_before']:.1f}%)"
        )
        out(f"  output vs bf16: relative L2 {100 * rel:.2f}%, SQNR {sqnr:.1f} dB")
        out(f"  quantize {t_q:.2f} s, quantized forward {t_f:.2f} s")
    results["total_s"] = time.perf_counter() - t_start
    out("")
    out(f"total {results['total_s']:.1f} s")
    return results


def _indent(text: str, pad: str = "  ") -> str:
    return "\n".join(pad + line for line in text.splitlines())


# --- plan ---------------------------------------------------------------------------------------


def _read_ignore(value: str | None) -> str | None:
    if value is None:
        return None
    if value.startswith("@"):
        path = value[1:]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise UserError(f"--ignore {value}: cannot read {path!r}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"--ignore {value}: {path!r} is not UTF-8 text ({e.reason})") from None
    return value


def _plan_inputs(args) -> tuple[list[LinearInfo], dict, str, object]:
    """(layers, shapes, description, header or None) for a file or a --reference model."""
    from .models import REFERENCE_MODELS, reference_shapes

    if args.reference:
        if args.reference not in REFERENCE_MODELS:
            raise UserError(f"--reference {args.reference!r}: known models are {', '.join(REFERENCE_MODELS)}")
        if args.file or args.measure:
            raise UserError("--reference plans a model without a file: give either FILE or --reference")
        shapes = reference_shapes(args.reference)
        return (
            linears_from_shapes(shapes),
            shapes,
            f"reference {args.reference} (shapes of the published configs)",
            None,
        )
    if not args.file:
        raise UserError("plan: give a .safetensors FILE (or --reference MODEL)")
    from .checkpoint import classify_checkpoint, read_header

    header = read_header(args.file)
    kind = classify_checkpoint(header)
    if kind.prequantized:
        # Planning online quantization of already-quantized weights would print a wrong plan.
        raise UserError(f"{args.file}: {kind.note}")
    shapes = header.shapes()
    return linears_from_shapes(shapes), shapes, args.file, header


def run_plan(args: argparse.Namespace, out=print) -> QuantPlan:
    layers, shapes, what, header = _plan_inputs(args)
    if not layers:
        raise UserError(f"{what}: no Linear weights (2-D '.weight' tensors) found")
    family = detect_family(shapes, shapes) if args.family == "auto" else args.family
    get_family(family)  # validate early
    ignore = _read_ignore(args.ignore)
    plan, _ = plan_from_text(layers, args.format, ignore, family, args.min_out)
    sqnr: dict[str, float] = {}
    if args.measure:
        sqnr = _measure(args.file, header, plan, args.device)
    if args.json:
        d = plan.to_dict()
        d["model"] = describe_model(shapes, shapes)
        d["source"] = what
        d["default_ignore_text"] = default_ignore_text(family, [li.name for li in layers])
        if args.measure:
            d["sqnr_db"] = {k: (v if math.isfinite(v) else str(v)) for k, v in sqnr.items()}
            for dec in d["decisions"]:
                v = sqnr.get(dec["name"])
                dec["sqnr_db"] = None if v is None else (v if math.isfinite(v) else str(v))
        out(json.dumps(d, indent=2))
        return plan
    out(f"{what}: {describe_model(shapes, shapes)}")
    out(plan.summary())
    if args.measure:
        out("")
        out(f"weight SQNR per quantized layer ({plan.format}, dB; worst first):")
        for name, v in sorted(sqnr.items(), key=lambda kv: kv[1]):
            out(f"  {v:7.2f}  {name}")
        finite = [v for v in sqnr.values() if math.isfinite(v)]
        if finite:
            out(
                f"  mean {sum(finite) / len(finite):.2f} dB, min {min(finite):.2f} dB "
                f"over {len(finite)} layers"
            )
    return plan


def _measure(path: str, header, plan: QuantPlan, device_name: str) -> dict[str, float]:
    """Per-layer weight SQNR, streaming: one tensor of the file in memory at a time."""
    from .checkpoint import iter_tensors
    from .formats import get_format
    from .selection.patterns import strip_prefix

    device = _pick_device(device_name)
    fmt = get_format(plan.format)
    wanted = [k for k in header.tensors if k.endswith(".weight") and _quantized(plan, k)]
    out: dict[str, float] = {}
    for key, t in iter_tensors(path, wanted, header=header):
        name = strip_prefix(key[: -len(".weight")])
        w = t.to(device)
        del t  # one copy of the layer at a time
        if not w.is_floating_point():
            raise UserError(f"{path}: {key} is {w.dtype}, not a float weight; it cannot be measured")
        try:
            qw = fmt.quantize(w)
        except OnlineQuantError as e:
            raise UserError(f"{path}: layer {name!r}: {e}") from None
        out[name] = _weight_sqnr_rows(fmt, w, qw)
        del w, qw
    return out


def _weight_sqnr_rows(fmt, w: torch.Tensor, qw, rows_elems: int = 1 << 22) -> float:
    """Weight SQNR (dB) accumulated over row chunks: no full fp32 copy of the layer is made.
    Same definition as quant.quality.sqnr_db (which it matches, tested); the inf conventions are
    quant.quality.sqnr_from_sums itself."""
    from .quality import sqnr_from_sums

    n, k = w.shape
    step = max(1, rows_elems // max(k, 1))
    signal = noise = 0.0
    for start in range(0, n, step):
        stop = min(n, start + step)
        ref = w[start:stop].float()
        deq = fmt.dequantize_rows(qw, start, stop, torch.float32)
        signal += float(torch.sum(ref * ref))
        noise += float(torch.sum((ref - deq) ** 2))
    return sqnr_from_sums(signal, noise)


def _quantized(plan: QuantPlan, key: str) -> bool:
    d = plan.decision(key[: -len(".weight")])
    return d is not None and d.quantize


# --- entry point -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .formats import FORMATS

    p = argparse.ArgumentParser(
        prog="python -m quant",
        description="Online FP8/MXFP4 quantization: the embedded default run (no arguments) and layer plans.",
    )
    sub = p.add_subparsers(dest="command")

    def demo_args(d: argparse.ArgumentParser) -> None:
        d.add_argument("--formats", default="fp8_e4m3fn,mxfp4", help="comma-separated formats to run")
        d.add_argument("--layers", type=int, default=1, help="main transformer layers (real model: 30)")
        d.add_argument("--refiners", type=int, default=0, help="noise/context refiner blocks each (real: 2)")
        d.add_argument("--seed", type=int, default=0)
        d.add_argument("--latent", type=int, default=16, help="latent height=width (tokens = (latent/2)^2)")
        d.add_argument("--caption-tokens", type=int, default=32)
        d.add_argument("--compute", default="auto", help="compute mode (auto, w8a8, w8a16, w4a16, ...)")
        d.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1")
        d.add_argument("--min-out", type=int, default=256, help="keep layers with fewer output features")
        d.add_argument("--json", action="store_true", help="print the numbers as JSON at the end")

    demo = sub.add_parser("demo", help="the embedded default run (same as no arguments)")
    demo_args(demo)

    plan = sub.add_parser("plan", help="print the quantization plan of a checkpoint (header only)")
    plan.add_argument("file", nargs="?", help="a .safetensors diffusion model")
    plan.add_argument(
        "--reference", help="plan a full-size model from known shapes: zimage, wan21_t2v_14b, ..."
    )
    plan.add_argument(
        "--format", default="fp8_e4m3fn", help=f"one of {', '.join(FORMATS)} (default fp8_e4m3fn)"
    )
    plan.add_argument(
        "--ignore",
        default=None,
        help="ignored-layers text, or @FILE to read it from a file; "
        "omitted = the family's defaults, '' = none",
    )
    plan.add_argument("--family", default="auto", choices=["auto", *family_choices()])
    plan.add_argument("--min-out", type=int, default=256, help="keep layers with fewer output features")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--measure", action="store_true", help="stream the weights and add per-layer SQNR (dB)")
    plan.add_argument("--device", default="cpu", help="device for --measure (cpu, cuda, auto)")

    defaults = sub.add_parser("defaults", help="print a family's default ignore text")
    defaults.add_argument("family", choices=family_choices())
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo", *argv]
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            if args.min_out < 0:
                raise UserError("--min-out must be >= 0")
            run_plan(args)
        elif args.command == "defaults":
            print(default_ignore_text(args.family), end="")
        else:
            if args.layers < 0 or args.refiners < 0 or args.latent < 2 or args.latent % 2:
                raise UserError("--layers/--refiners must be >= 0 and --latent an even number >= 2")
            res = run_demo(args)
            if args.json:
                print(json.dumps(res, indent=2))
    except (UserError, OnlineQuantError, ValueError) as e:
        # ValueError: get_format's unknown-format message and friends; all are user input.
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `python -m quant plan ... | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0
