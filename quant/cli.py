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
from collections.abc import Sequence

import torch

from .checkpoint import classify_checkpoint, iter_tensors, read_header, read_packed_info
from .demo import pick_device, run_demo
from .errors import OnlineQuantError
from .errors import UsageError as UserError
from .formats import FORMATS, get_format
from .models import (
    REFERENCE_MODELS,
    default_ignore_text,
    family_choices,
    reference_shapes,
)
from .quality import sqnr_from_sums
from .selection.checkpoint_plan import plan_checkpoint
from .selection.patterns import strip_prefix
from .selection.plan import (
    QuantPlan,
)

EXIT_USAGE = 2


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


def _plan_inputs(args) -> tuple[dict, str, object, object]:
    """(shapes, description, header or None, checkpoint kind or None) for a file or a --reference model."""
    if args.reference:
        if args.reference not in REFERENCE_MODELS:
            raise UserError(f"--reference {args.reference!r}: known models are {', '.join(REFERENCE_MODELS)}")
        if args.file or args.measure:
            raise UserError("--reference plans a model without a file: give either FILE or --reference")
        shapes = reference_shapes(args.reference)
        return shapes, f"reference {args.reference} (shapes of the published configs)", None, None
    if not args.file:
        raise UserError("plan: give a .safetensors FILE (or --reference MODEL)")
    header = read_header(args.file)
    return header.shapes(), args.file, header, classify_checkpoint(header)


def run_plan(args: argparse.Namespace, out=print) -> QuantPlan:
    shapes, what, header, kind = _plan_inputs(args)
    ignore = _read_ignore(args.ignore)
    packed = read_packed_info(header) if header is not None else None  # a saved quantized file's plan
    cp = plan_checkpoint(
        shapes,
        args.format,
        ignore,
        family=args.family,
        min_out_features=args.min_out,
        kind=kind,
        file=what,
        packed=packed,
    )
    plan = cp.plan
    sqnr: dict[str, float] = {}
    if args.measure and cp.quantize and packed is None:
        sqnr = _measure(args.file, header, plan, args.device)
    if args.json:
        d = plan.to_dict()
        d["model"] = cp.description
        d["source"] = what
        d["default_ignore_text"] = default_ignore_text(cp.family, [x.name for x in plan.decisions])
        d["notes"] = cp.notes
        d["warnings"] = cp.warnings
        if args.measure:
            d["sqnr_db"] = {k: (v if math.isfinite(v) else str(v)) for k, v in sqnr.items()}
            for dec in d["decisions"]:
                v = sqnr.get(dec["name"])
                dec["sqnr_db"] = None if v is None else (v if math.isfinite(v) else str(v))
        out(json.dumps(d, indent=2))
        return plan
    out(f"{what}: {cp.description}")
    out(plan.summary())
    for note in cp.notes:
        out(f"note: {note}")
    for w in cp.warnings[len(plan.warnings) :]:
        out(f"warning: {w}")
    if args.measure and sqnr:
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
    device = pick_device(device_name)
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
        d.add_argument(
            "--verbose", action="store_true", help="also the full-size plan and why each backend was chosen"
        )

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
