"""Weight SQNR as the loader measures it (sampled rows, exact per row), and the bytes a plan
leaves in the compute dtype."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..formats import QuantizedWeight, get_format
from ..selection.patterns import strip_prefix
from .metrics import signal_noise_sums, sqnr_db, sqnr_from_sums


def sample_rows(n: int, rows: int | None) -> Tensor | None:
    """Evenly spaced row indices (None = all rows: `rows` is None or >= n)."""
    if rows is None or rows >= n:
        return None
    return torch.linspace(0, n - 1, max(rows, 1)).round().long()


def quantized_weight_sqnr_db(w: Tensor, qw, rows: int | None = 256) -> float:
    """Weight SQNR (dB) of a `formats.QuantizedWeight` against the weight [N, K] it was made from:
    the load report's per-layer number.

    Every format here is row-local (per-channel or per-tensor FP8 scales, MXFP4 blocks along K),
    so the error of a row does not depend on the other rows: with `rows` set, only that many
    evenly spaced rows are dequantized and compared, which makes the measurement cost
    rows/N of a full one (on CPU a full dequantize + compare costs about as much as the
    quantization itself). `rows=None` measures every row."""

    return sqnr_from_sums(*quantized_weight_sqnr_sums(w, qw, rows).tolist())


def quantized_weight_sqnr_sums(w: Tensor, qw, rows: int | None = 256) -> Tensor:
    """(Σw², Σ(w−ŵ)²) over the rows `quantized_weight_sqnr_db` samples: float64 [2] on w's
    device, with no synchronisation, so a loader can queue one per layer and read them all at
    once (`sqnr_from_sums` turns a pair into dB)."""
    idx = sample_rows(w.shape[0], rows)
    if idx is None:
        return signal_noise_sums(w, qw.dequantize(torch.float32))
    idx = idx.to(qw.qdata.device)
    per_row = qw.scale.dim() > 0 and qw.scale.shape[0] == w.shape[0]
    scale = qw.scale.index_select(0, idx) if per_row else qw.scale  # a per-tensor scale stays
    shape = (int(idx.numel()), qw.shape[1])
    part = QuantizedWeight(qw.format, qw.qdata.index_select(0, idx), scale, shape)
    return signal_noise_sums(w.index_select(0, idx.to(w.device)), part.dequantize(torch.float32))


def estimate_weight_sqnr_db(w: Tensor, format: str, rows: int | None = 256) -> float:
    """SQNR (dB) that quantizing `w` [N, K] with `format` would give, from `rows` evenly spaced rows
    only (quantized together with the row holding the tensor's amax, so a per-tensor scale is the
    full tensor's). Exact per row for every format here (they are row-local); `rows=None`
    quantizes the whole weight. Costs about rows/N of a real quantization."""

    fmt = get_format(format)
    idx = sample_rows(w.shape[0], rows)
    if idx is None:
        return quantized_weight_sqnr_db(w, fmt.quantize(w), rows=None)
    idx = idx.to(w.device)
    amax_row = w.abs().amax(dim=1).argmax().reshape(1)
    part = w.index_select(0, torch.cat([idx, amax_row]))
    deq = fmt.quantize(part).dequantize(torch.float32)[:-1]
    return sqnr_db(part[:-1], deq)


def measure_weight_sqnr(
    tensors, plan, *, device: torch.device | str | None = None, rows: int | None = 256
) -> dict[str, float]:
    """Stream `(state-dict key, tensor)` pairs (a loaded state dict's `.items()`, or
    `safetensors_header.iter_tensors(path)`), and return name -> estimated SQNR (dB) for every
    weight the plan quantizes, with the plan's format (`estimate_weight_sqnr_db`).

    This is the pre-pass that global sensitivity rules ("worst 5%", "max 12 GB") need before
    the real load; with `rows` sampling it costs a few % of the load."""

    out: dict[str, float] = {}
    for key, t in tensors:
        if not key.endswith(".weight") or getattr(t, "dim", lambda: 0)() != 2:
            continue
        name = strip_prefix(key[: -len(".weight")])
        d = plan.decision(name)
        if d is None or not d.quantize:
            continue
        if hasattr(t, "materialize"):  # a lazily read tensor (safetensors_header.lazy_state_dict): read once
            t = t.materialize()
        if device is not None:
            t = t.to(device)
        out[name] = estimate_weight_sqnr_db(t, plan.format, rows)
    return out


def other_param_bytes(shapes: Mapping[str, Sequence[int]], plan, dtype_bytes: int = 2) -> int:
    """Bytes of the parameters that are not Linear weights of the plan (biases, norms, embeddings,
    convolutions), at `dtype_bytes` per value: what a byte budget must count besides the plan."""

    total = 0
    for key, shape in shapes.items():
        if key.endswith(".weight") and plan.decision(strip_prefix(key[: -len(".weight")])) is not None:
            continue
        total += math.prod(shape) * dtype_bytes
    return total


__all__ = [
    "estimate_weight_sqnr_db",
    "measure_weight_sqnr",
    "other_param_bytes",
    "quantized_weight_sqnr_db",
    "quantized_weight_sqnr_sums",
    "sample_rows",
]
