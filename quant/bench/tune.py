"""Tuning sweep (not in the default run): launch configurations of each Triton kernel at a few
representative shapes; prints the fastest so kernels/*.py defaults and kernels/tuning.py can be
set from measurements. `python -m quant.bench --sections tune`."""

from __future__ import annotations

import logging

import torch

from ..formats import get_format
from ..kernels import fp8_dequant, fp8_gemm, fp8_quant, mxfp4_gemm
from .timing import bench_ms

log = logging.getLogger(__name__)

TUNE_SHAPES = [  # (label, M, K, N)
    ("zimage qkv", 4352, 3840, 11520),
    ("wan22_5b ffn.2", 27280, 14336, 3072),
    ("wan22_5b cross_attn.k/v (512 text tokens)", 512, 3072, 3072),
]
FUSED_CONFIGS = [(128, 128, 8, 3), (128, 128, 4, 4), (128, 256, 8, 3), (64, 128, 4, 4)]
W4A16_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (64, 128, 128, 4, 4)]
DOT_SCALED_CONFIGS = [(128, 128, 128, 8, 3), (128, 128, 64, 4, 4), (128, 256, 128, 8, 3)]
W4A8_CONFIGS = [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 128, 4, 4)]
QUANT_CONFIGS = [(1, 4), (1, 8), (2, 8), (4, 16)]  # (rows per program, num_warps)
# weights-only FP8 with the weight widened in registers: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
W8A16_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (128, 256, 64, 8, 3),
    (64, 128, 128, 4, 4),
    (64, 64, 128, 4, 4),
]


def _jobs(x, q8, q4, smax):
    jobs = []
    for c in FUSED_CONFIGS:
        jobs.append(
            ("fp8_fused", c, lambda c=c: fp8_gemm.fp8_linear_act_fused(x, q8.qdata, q8.scale, config=c))
        )
    for c in W4A16_CONFIGS:
        jobs.append(
            ("mxfp4_w4a16", c, lambda c=c: mxfp4_gemm.mxfp4_linear_w4a16(x, q4.qdata, q4.scale, config=c))
        )
    for c in DOT_SCALED_CONFIGS:
        jobs.append(
            (
                "mxfp4_dot_scaled",
                c,
                lambda c=c: mxfp4_gemm.mxfp4_linear_w4a16_dot_scaled(x, q4.qdata, q4.scale, config=c),
            )
        )
    for c in W4A8_CONFIGS:
        jobs.append(
            (
                "mxfp4_w4a8",
                c,
                lambda c=c: mxfp4_gemm.mxfp4_linear_w4a8(x, q4.qdata, q4.scale, config=c, row_smax=smax),
            )
        )
    for c in W8A16_CONFIGS:
        jobs.append(
            (
                "fp8_w8a16_fused",
                c,
                lambda c=c: fp8_dequant.fp8_linear_w8a16_fused(x, q8.qdata, q8.scale, config=c),
            )
        )
    # the workspace path it competes with, at the same shape (no configuration of its own)
    jobs.append(("fp8_w8a16_dequant", "-", lambda: fp8_dequant.fp8_linear_w8a16(x, q8.qdata, q8.scale)))
    for c in QUANT_CONFIGS:
        jobs.append(("act_quant", c, lambda c=c: fp8_quant.quantize_fp8_per_token(x, launch=c)))
    return jobs


def _try(fn, device):
    try:
        fn()
        return round(bench_ms(fn, device), 4), None
    except Exception as e:  # out of shared memory etc.
        return None, f"{type(e).__name__}: {str(e)[:120]}"


def run(args, device: torch.device) -> list[dict]:
    if device.type != "cuda":
        return []
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for label, m, k, n in TUNE_SHAPES:
        w = (torch.randn((n, k), generator=g, device=device) * 0.02).to(torch.bfloat16)
        x = torch.randn((m, k), generator=g, device=device).to(torch.bfloat16)
        q8 = get_format("fp8_e4m3fn").quantize(w)
        q4 = get_format("mxfp4").quantize(w)
        smax = mxfp4_gemm.row_scale_max(q4.scale)
        for kernel, c, fn in _jobs(x, q8, q4, smax):
            ms, err = _try(fn, device)
            row = dict(table="tune", shape=label, M=m, K=k, N=n, kernel=kernel, config=str(c), ms=ms)
            if err:
                row["error"] = err
            elif kernel == "act_quant":
                row["GB/s"] = round(m * k * 3 / ms / 1e6, 1)
            else:
                row["TFLOP/s"] = round(2 * m * n * k / ms / 1e9, 1)
            rows.append(row)
        best = {}
        for r in rows:
            mine = r["shape"] == label and r.get("ms") is not None
            if mine and (r["kernel"] not in best or r["ms"] < best[r["kernel"]]["ms"]):
                best[r["kernel"]] = r
        for r in best.values():
            r["best"] = True
        torch.cuda.empty_cache()
    return rows
