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


# Below this many tokens the GEMM is weight-bandwidth-bound and the fused in-register decode (which
# reads 0.53 bytes per weight once) beats writing a 16-bit workspace first. Diffusion steps run
# thousands of tokens per Linear, where the workspace + cuBLAS path wins (H100 run, D.md).
MXFP4_DEQUANT_MIN_M = 256


def choose_mxfp4_path(m: int, n: int, k: int) -> str:
    """"dequant" (decode to a transient workspace, then cuBLAS) or "fused" (decode in registers)."""
    return "dequant" if m >= MXFP4_DEQUANT_MIN_M else "fused"
