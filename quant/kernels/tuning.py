"""Per-shape choice between the FP8 paths, from measurements on an H100 (see .dev/notes/D.md for
the table and the command that produced it: `python -m quant.bench --sections gemm`).

Rule: the row-wise path (Triton per-token quant + cuBLAS `_scaled_mm`) unless the fused Triton
GEMM measured faster for that (K, N) at large M; small M (< 256 tokens) always row-wise (the fused
kernel's 128-row tiles waste most of their work there). Shapes `_scaled_mm` cannot take (K or N
not a multiple of 16) go to the fused kernel, which has no such constraint.
"""

from __future__ import annotations

# (K, N) -> path at M >= 256; filled from the H100 run. Missing shapes use the K/N rule below.
FP8_PATH_BY_SHAPE: dict[tuple[int, int], str] = {}


def choose_fp8_path(m: int, n: int, k: int) -> str:
    """"rowwise" or "fused" for an [m, k] x [k, n] FP8 linear."""
    if n % 16 or k % 16:
        return "fused"
    if m < 256:
        return "rowwise"
    return FP8_PATH_BY_SHAPE.get((k, n), "rowwise")


def choose_mxfp4_compute(m: int, n: int, k: int) -> str:
    """MXFP4 on Hopper: W4A16 (bf16 tensor cores) is the default; W4A8 is asked for explicitly."""
    return "w4a16"
