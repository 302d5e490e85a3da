"""GEMM level: every path of quant/bench/paths.py at the real Linear shapes, M = 4096 and 32760
(time, TFLOP/s, speed-up over bf16 F.linear, output error against bf16, weight bytes, and host
time per call at M <= 256)."""

from __future__ import annotations

import functools
import gc
import logging

import torch

from .paths import build_paths
from .shapes import DEFAULT_M, LINEAR_SHAPES, QUICK_M, QUICK_SHAPES
from .timing import bench_ms, host_us, rel_l2

log = logging.getLogger(__name__)

# At or below this many tokens a Linear's kernels are shorter than the host's work per call, so the
# rows also report host time per call ("host_us"): what stalls the GPU between such layers.
HOST_TIME_MAX_M = 256


def add_args(parser) -> None:
    parser.add_argument("--m", default=None, help="comma-separated token counts (default 4096,32760)")
    parser.add_argument("--gemm-models", default="", help="only shapes of these models (comma list)")
    parser.add_argument("--shapes", default="", help="explicit M:K:N list instead (comma separated)")
    parser.add_argument(
        "--gemm-paths", default="", help="only these paths of quant/bench/paths.py (comma list; bf16 always)"
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also time compiled paths: gemm, the plain-PyTorch FP8 path (compiles per shape); models, "
        "each variant under torch.compile against compiled bf16",
    )


def run(args, device: torch.device) -> list[dict]:
    shapes = QUICK_SHAPES if args.quick else LINEAR_SHAPES
    if getattr(args, "gemm_models", ""):
        keep = set(args.gemm_models.split(","))
        shapes = [s for s in shapes if s[0] in keep]
    ms = QUICK_M if args.quick else DEFAULT_M
    if getattr(args, "m", None):
        ms = tuple(int(v) for v in args.m.split(","))
    explicit: dict[tuple[int, int], list[int]] = {}
    for spec in [t for t in getattr(args, "shapes", "").split(",") if t]:
        m_, k_, n_ = (int(v) for v in spec.split(":"))
        explicit.setdefault((k_, n_), []).append(m_)
    if explicit:
        shapes = [("custom", f"{k}->{n}", k, n) for k, n in explicit]
    only = {p for p in getattr(args, "gemm_paths", "").split(",") if p}
    rows: list[dict] = []
    g = torch.Generator(device=device).manual_seed(0)
    for model, layer, k, n in shapes:
        if explicit:
            ms = tuple(explicit[k, n])
        w = (torch.randn((n, k), generator=g, device=device) * 0.02).to(torch.bfloat16)
        b = (torch.randn((n,), generator=g, device=device) * 0.02).to(torch.bfloat16)
        for m in ms:
            x = torch.randn((m, k), generator=g, device=device).to(torch.bfloat16)
            paths = build_paths(w, b, x, include_compiled=getattr(args, "compiled", False))
            if only:
                if unknown := sorted(only - paths.keys()):
                    raise ValueError(f"--gemm-paths: no path {unknown}; choose from {list(paths)}")
                paths = {name: v for name, v in paths.items() if name == "bf16" or name in only}
            ref = paths["bf16"][0](x)
            t_bf16 = None
            for name, (fn, nbytes) in paths.items():
                run_it = functools.partial(fn, x)
                row = dict(table="gemm", model=model, layer=layer, M=m, K=k, N=n, path=name)
                try:
                    out = run_it()
                    ms_ = bench_ms(run_it, device)
                except Exception as e:  # a path that cannot run here is reported, not fatal
                    log.warning("gemm %s %dx%dx%d failed: %s", name, m, k, n, e)
                    row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
                    rows.append(row)
                    continue
                if name == "bf16":
                    t_bf16 = ms_
                row["ms"] = round(ms_, 4)
                if m <= HOST_TIME_MAX_M:
                    # CPU runs (--quick, CI) only exercise the code: host time there means nothing
                    row["host_us"] = round(host_us(run_it, device, 200 if device.type == "cuda" else 2), 1)
                if name == "act_quant_only":
                    moved = m * k * (x.element_size() + 1) + m * 4
                    row["GB/s"] = round(moved / ms_ / 1e6, 1)
                else:
                    row["TFLOP/s"] = round(2 * m * n * k / ms_ / 1e9, 1)
                    row["speedup_vs_bf16"] = round(t_bf16 / ms_, 3) if t_bf16 else None
                    row["rel_err_vs_bf16"] = round(rel_l2(out, ref), 5)
                    row["weight_bytes"] = nbytes
                rows.append(row)
                log.info("gemm row: %s", row)  # a run cut short by a timeout keeps what it measured
                del out
            del x, ref, paths
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
