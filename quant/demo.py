"""``python -m quant`` (the embedded default run): a deterministic toy Z-Image (real width 3840 and
ComfyUI's NextDiT layer names, 1 layer, no refiners by default, seeded random weights) is planned
with the Z-Image defaults and quantized to FP8 and to MXFP4; prints the plan, bytes before/after,
each format's output error against bf16 and the time taken. Uses a GPU when there is one."""

from __future__ import annotations

import argparse
import time

import torch

from . import quality
from .bench.toy_model import build_toy_zimage, toy_inputs
from .errors import UsageError as UserError
from .formats import get_format
from .matmul.linear import quantized_linear
from .matmul.registry import choose_backend
from .selection.layers import linears_from_module, reference_linears
from .selection.plan import build_plan, compact_names, format_bytes


class _QuantLinear(torch.nn.Module):
    """Stand-in for a quantized nn.Linear in the toy model (the ComfyUI layout lives in nodes/)."""

    def __init__(self, qw, bias: torch.Tensor | None, compute: str):
        super().__init__()
        self.qw, self.bias, self.compute = qw, bias, compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name!r}: this PyTorch has no CUDA device")
    return dev


def run_demo(args: argparse.Namespace, out=print) -> dict:
    """The embedded default. Returns the numbers it printed (tests and notes use them)."""

    t_start = time.perf_counter()
    device = pick_device(args.device)
    formats = [get_format(f).name for f in args.formats.split(",") if f.strip()]
    where = f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    if device.type == "cpu":
        where += f", {torch.get_num_threads()} threads"
    blocks = f"{args.layers} layer" + ("s" if args.layers != 1 else "")
    blocks += f" and {args.refiners}+{args.refiners} refiner blocks" if args.refiners else ", no refiners"
    out(f"toy Z-Image (width 3840, ComfyUI's layer names, {blocks}, random weights) in bf16 on {where}")
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
            if args.verbose:
                out(f"plan for full-size Z-Image ({len(full)} Linear layers), default ignore list:")
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
        out(f"{fmt_name}: backend {choice.name} ({choice.compute})")
        if args.verbose:
            out(f"  why: {choice.describe()}")
        out(
            f"  Linear weights, toy:       {format_bytes(r['bytes_before'])} -> "
            f"{format_bytes(r['bytes_after'])} "
            f"({100 * r['bytes_after'] / r['bytes_before']:.1f}%)"
        )
        out(
            f"  Linear weights, full-size Z-Image ({len(full)} layers): "
            f"{format_bytes(r['full_size_bytes_before'])} "
            f"-> {format_bytes(r['full_size_bytes_after'])} "
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
