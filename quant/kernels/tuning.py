"""Per-shape choice between the GEMM paths, from measurements on an H100 80GB (torch 2.11+cu130,
Triton 3.6; `python -m quant.bench --sections gemm`, tables in docs/benchmarks.md).

FP8 (every Z-Image / Wan Linear shape, M = 4096 and 32760):
- row-wise: Triton per-token quant (2.1-3.0 TB/s) + `_scaled_mm` row-wise with fast accumulation:
  1.3-1.95x bf16, error 3.8% vs bf16 on N(0,1) data;
- fused Triton block-FP8 GEMM (1x128 activation groups quantized in the tile load): 0.44-0.55x
  bf16 (310-370 TFLOP/s; the quantize-in-registers A operand and the per-group rescale of the
  accumulator keep it far from cuBLAS). It won no shape, so FP8_PATH_BY_SHAPE is empty; it runs
  only where `_scaled_mm` cannot (K or N not a multiple of 16).
MXFP4 (W4A16): decode to a transient bf16 workspace + cuBLAS: 0.90-1.11x bf16; in-register decode
GEMMs: 0.30-0.36x (hand-written) and 0.39-0.47x (`tl.dot_scaled`): the decode is ALU work that
the bf16 wgmma cannot hide at these tile sizes. Fused decode is kept for small M, where reading
0.53 bytes per weight once beats writing a workspace first (not measured on H100: diffusion
steps never run fewer than thousands of tokens per Linear).
"""

from __future__ import annotations

# (K, N) -> path at M >= 256; filled from the H100 run. Missing shapes use the K/N rule below.
FP8_PATH_BY_SHAPE: dict[tuple[int, int], str] = {}


# FP8 W8A8 at or below this many tokens: the layer runs the weights-only in-register GEMM below
# instead (activations stay bf16: one launch, no activation pass, and no less accurate). Such calls
# (adaLN modulation, time embeddings) are bound by host time and by reading the weight. H100
# (`--sections gemm --shapes 1:256:15360,16:5120:5120,64:3840:3840`), in-register vs activation
# quantization + row-wise `_scaled_mm`: 0.0085 vs 0.0125 ms at M = 1, 0.0260 vs 0.0268 ms at M = 16,
# 43-44 vs 70-71 us of host time a call; at M = 64 it loses (0.0253 vs 0.0198 ms).
FP8_W8A8_IN_REGISTERS_MAX_M = 16


def choose_fp8_path(m: int, n: int, k: int) -> str:
    """ "rowwise", "fused" or "in_registers" (the W8A16 GEMM, few tokens) for an [m, k] x [k, n]
    FP8 linear."""
    if m <= FP8_W8A8_IN_REGISTERS_MAX_M:
        return "in_registers"
    if n % 16 or k % 16:
        return "fused"
    if m < 256:
        return "rowwise"
    return FP8_PATH_BY_SHAPE.get((k, n), "rowwise")


# FP8 weights-only (W8A16): at or below this many tokens the GEMM is bound by reading the weight and
# the Triton GEMM that widens FP8 tiles in registers (one byte per weight, one launch) is used;
# above it, the weight is dequantized to a workspace for cuBLAS. H100 (`--sections gemm`, paths
# ours_fp8_w8a16_fused / ours_fp8_w8a16): the in-register GEMM won every shape measured at M = 1,
# 16 and 64 (0.009 vs 0.014 ms at 1x256x15360, 0.069 vs 0.142 ms at 64x5120x13824), split at
# M = 128 (lost 3840x3840, won 5120x13824) and lost from M = 256 (0.44x bf16 at M = 4096).
FP8_W8A16_FUSED_MAX_M = 64


def choose_fp8_w8a16_path(m: int, n: int, k: int) -> str:
    """ "fused" (FP8 tiles widened in registers) or "dequant" (workspace + cuBLAS)."""
    return "fused" if m <= FP8_W8A16_FUSED_MAX_M else "dequant"


# Below this many tokens the GEMM is weight-bandwidth-bound and the fused in-register decode (which
# reads 0.53 bytes per weight once) beats writing a 16-bit workspace first. Diffusion steps run
# thousands of tokens per Linear, where the workspace + cuBLAS path wins (H100 run, docs/benchmarks.md).
MXFP4_DEQUANT_MIN_M = 256


def choose_mxfp4_path(m: int, n: int, k: int) -> str:
    """ "dequant" (decode to a transient workspace, then cuBLAS) or "fused" (decode in registers)."""
    return "dequant" if m >= MXFP4_DEQUANT_MIN_M else "fused"
