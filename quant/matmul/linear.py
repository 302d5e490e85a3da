"""quantized_linear: the one entry point for a matmul with a quantized weight.

Compute modes (`compute=`) are named for weight/activation bits; matmul/reference.py defines
each one. "auto" takes whatever matmul/registry.py picks for the device (see BackendChoice.reason).
"""

from __future__ import annotations

import torch

from ..formats import QuantizedWeight, get_format
from . import op
from .registry import resolve_traced, run_linear


def quantized_linear(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: torch.Tensor | None = None,
    compute: str = "auto",
    backend: str | None = None,
) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32) times the quantized weight -> [..., N] in x.dtype.

    Goes through the torch.library op of the format's kind (onlinequant::fp8_linear /
    onlinequant::mxfp4_linear), whose implementation asks quant/backends.py for the backend, so
    torch.compile(fullgraph=True) sees one opaque op. `backend` forces a registered backend by
    name (BackendUnavailableError naming the package when it cannot run here).

    In eager mode with no gradient to record (ComfyUI samples under inference_mode), the op's
    implementation is called directly: same backend, same result, without the dispatcher's
    host cost (docs/benchmarks.md). The backend is resolved once per (format, device, compute).

    While a graph is traced below Dynamo (AOTAutograd tracing a compiled model's quantized
    weights through their layout's aten.linear handler, make_fx), the backend's plain-PyTorch
    `traced_run` goes into the graph instead of the opaque op, so Inductor can fuse the
    activation quantization into the op producing x; backends without one keep the op.
    """
    if op.eager_ok(x, bias, qw.scale):
        return run_linear(x, qw, bias, compute, backend)
    fmt = get_format(qw.format)
    fmt.check_compute(compute)
    if x.shape[-1] != qw.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the {fmt.name} weight expects {qw.shape[1]}")
    if op.graph_traced(x, bias, qw.scale):
        traced = resolve_traced(qw.format, x.device, compute, backend)
        if traced is not None:
            run, mode = traced
            return run(x, qw, bias, mode)
    return op.linear_op(fmt.kind)(x, qw.qdata, qw.scale, bias, fmt.name, compute, backend or "")


__all__ = ["quantized_linear"]
