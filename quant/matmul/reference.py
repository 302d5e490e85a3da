"""The plain-PyTorch quantized matmul: the correct fallback everywhere, and what every kernel is
tested against. `python -m quant.matmul.reference [K N M]` prints its error table.

Compute modes (`compute=`), named for weight/activation bits:
- "w8a16" / "w4a16": dequantize the weight to x.dtype and matmul (weight-only quantization).
- "w8a8": activations quantized per token to the weight's FP8 dtype (quant.formats.fp8.quantize_activation),
  fp32 accumulation of the FP8 products, then `acc * x_scale * w_scale` — exactly what an FP8
  GEMM with row-wise scales computes, up to summation order.
- "w4a8": MXFP4 weight, FP8 e4m3fn per-token activations, fp32 accumulation.
- "w4a4": activations quantized to MXFP4 along K with the weight format's rounding (AITER's
  a4w4 path quantizes activations with dynamic_mxfp4_quant), fp32 matmul of the exact values.
- "auto": whatever quant/backends.py picks for the device (see BackendChoice.reason).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import FORMATS, QuantizedWeight, get_format

# Weight rows dequantized at a time: about 4 Mi elements (16 MiB in fp32), so a 13824x5120 layer
# never needs a full fp32 (283 MB) copy.
_CHUNK_ELEMS = 1 << 22


def _row_step(n: int, k: int) -> int:
    return max(1, min(n, _CHUNK_ELEMS // max(k, 1)))


def reference_linear(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, compute: str = "auto"
) -> torch.Tensor:
    """Plain-PyTorch quantized linear: x [..., K] -> [..., N] in x.dtype (see module docstring)."""
    fmt = get_format(qw.format)
    if compute == "auto":
        compute = fmt.computes[-1]  # the weight-only mode: exact dequantize + matmul
    act = fmt.check_compute(compute).split("a", 1)[1]  # "w8a16" -> "16"
    n, k = qw.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the quantized weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    step = _row_step(n, k)

    if act == "16":
        out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
        for i in range(0, n, step):
            w = fmt.dequantize_rows(qw, i, i + step, x.dtype)
            out[:, i : i + step] = F.linear(x2, w)
        if bias is not None:
            out += bias.to(x.dtype)
        return out.view(*lead, n)

    # Emulated low-precision activations: exact values in fp32, fp32 accumulation; a per-token
    # scale (FP8 activations) is applied after the accumulation, as FP8 GEMMs do.
    xf, row_scale = fmt.quantize_activation_values(x2, act)
    out32 = torch.empty((x2.shape[0], n), dtype=torch.float32, device=x.device)
    for i in range(0, n, step):
        wq, wscale = fmt.dequantize_rows_unscaled(qw, i, i + step)
        acc = xf @ wq.t()
        if wscale is not None:
            acc *= wscale.reshape(1, -1) if wscale.dim() else wscale
        out32[:, i : i + step] = acc
    if row_scale is not None:
        out32 *= row_scale
    if bias is not None:
        out32 += bias.float()
    return out32.to(x.dtype).view(*lead, n)


def output_error_table(
    k: int = 3840, n: int = 1024, m: int = 256, seed: int = 0
) -> list[tuple[str, str, float]]:
    """Relative L2 error of one quantized Linear against fp64, N(0,1) weights and activations:
    [(format, compute, error)] for every registered format and compute mode (reference paths)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    ref = x.double() @ w.double().t()
    rows = []
    for name, fmt in FORMATS.items():
        qw = fmt.quantize(w)
        for compute in fmt.computes:
            y = reference_linear(x, qw, None, compute)
            rows.append((name, compute, float((y.double() - ref).norm() / ref.norm())))
    return rows


def main(argv: list[str] | None = None) -> None:
    """`python -m quant.matmul.linear [K N M]`: print the per-Linear output error table."""
    import sys

    args = [int(a) for a in (sys.argv[1:] if argv is None else argv)]
    k, n, m = (args + [3840, 1024, 256][len(args) :])[:3]
    print(f"relative L2 output error, one Linear, N(0,1) weights and activations, K={k} N={n} M={m}")
    print(f"{'format':<20}{'compute':<9}{'error':>8}")
    for name, compute, err in output_error_table(k, n, m):
        print(f"{name:<20}{compute:<9}{100 * err:>7.2f}%")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    print(f"\nweight SQNR, N(0,1) {n}x{k}")
    for name, fmt in FORMATS.items():
        noise = (w - fmt.dequantize(fmt.quantize(w), torch.float32)).norm()
        print(f"{name:<20}{float(20 * torch.log10(w.norm() / noise)):>6.2f} dB")



if __name__ == "__main__":
    main()


__all__ = ["output_error_table", "reference_linear"]
