"""Quality metrics: how far a quantized weight, layer output or image is from its reference.

All metrics accumulate in fp32 over bounded chunks (so a 5120x13824 bf16 weight never needs a
full fp32 copy) and sum the chunk totals in fp64. They run on whatever device the tensors are on.
Conventions: SQNR/PSNR are `inf` when the test tensor equals the reference exactly; SQNR is
`-inf` when the reference is all zeros but the test is not (no signal, some noise).

Also here: fake quantization through the formats' reference code, and the per-layer weight SQNR
the loader records. quant/sensitivity.py (keep the worst layers in bf16) and
quant/activation_stats.py (first-forward activation statistics) are re-exported at the end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

# Elements per chunk: 4 Mi fp32 elements = 16 MiB of temporaries per operand.
_CHUNK = 1 << 22


def _check_pair(ref: Tensor, test: Tensor) -> None:
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs test {tuple(test.shape)}")


def _signal_and_noise(ref: Tensor, test: Tensor) -> tuple[float, float]:
    """Return (sum ref^2, sum (ref - test)^2), fp32 per chunk, fp64 across chunks."""
    _check_pair(ref, test)
    r = ref.detach().reshape(-1)
    t = test.detach().reshape(-1)
    if t.device != r.device:
        t = t.to(r.device)
    signal = 0.0
    noise = 0.0
    for start in range(0, r.numel(), _CHUNK):
        rc = r[start : start + _CHUNK].float()
        d = rc - t[start : start + _CHUNK].float()
        # dot products: one BLAS pass each, fp32 accumulation (no x*x temporaries)
        signal += float(torch.dot(rc, rc))
        noise += float(torch.dot(d, d))
    return signal, noise


def sqnr_from_sums(signal: float, noise: float) -> float:
    """SQNR (dB) from the sums Σref² and Σ(ref−test)²: the one place for the inf/-inf/NaN
    conventions (also used by the CLI's row-chunked weight SQNR)."""
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(ref: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10·log10(Σref² / Σ(ref−test)²), in dB.

    `inf` when `test` equals `ref`; `-inf` when `ref` is all zeros and `test` is not. Any dtype
    (bf16, fp16, fp8 upcast by the caller, fp32); accumulation is fp32 per chunk.
    """
    return sqnr_from_sums(*_signal_and_noise(ref, test))


def weight_sqnr_db(w: Tensor, dequantized: Tensor) -> float:
    """SQNR (dB) of a dequantized weight against the original weight (the loader's per-layer
    number). Same as `sqnr_db`, kept as its own name so the load report's meaning is explicit."""
    return sqnr_db(w, dequantized)


def relative_l2(ref: Tensor, test: Tensor) -> float:
    """‖ref − test‖₂ / ‖ref‖₂ (0.0 for exact, `inf` when ref is zero and test is not)."""
    signal, noise = _signal_and_noise(ref, test)
    if noise == 0.0:
        return 0.0
    if signal == 0.0:
        return math.inf
    return math.sqrt(noise / signal)


def channel_sqnr_db(ref: Tensor, test: Tensor) -> Tensor:
    """Per-row SQNR in dB (fp32, shape ref.shape[:-1]): for a weight [N, K], one number per output
    channel. The global SQNR is dominated by the largest rows; this shows the small rows that a
    per-tensor scale flushes to zero (the FP8 tensor-vs-channel question)."""
    _check_pair(ref, test)
    r = ref.detach().float()
    d = r - test.detach().to(r.device).float()
    signal = (r * r).sum(-1)
    noise = (d * d).sum(-1)
    out = 10.0 * torch.log10(signal / noise)
    out = torch.where(noise == 0, torch.full_like(out, math.inf), out)
    return torch.where((signal == 0) & (noise > 0), torch.full_like(out, -math.inf), out)


def mse(ref: Tensor, test: Tensor) -> float:
    """Mean squared error, fp32 per chunk."""
    _, noise = _signal_and_noise(ref, test)
    return noise / max(ref.numel(), 1)


def psnr_db(ref: Tensor, test: Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB for images/frames with values in [0, data_range]
    (ComfyUI IMAGE tensors are [B, H, W, C] in [0, 1]). `inf` when identical."""
    err = mse(ref, test)
    if err == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range * data_range / err)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma * sigma))
    return g / g.sum()


def ssim(
    ref: Tensor,
    test: Tensor,
    data_range: float = 1.0,
    *,
    channels_last: bool = True,
    window: int = 11,
    sigma: float = 1.5,
    batch_chunk: int = 8,
) -> float:
    """Mean structural similarity (Wang et al. 2004: Gaussian window 11, sigma 1.5,
    K1 = 0.01, K2 = 0.03, 'valid' filtering) over all images/frames and channels.

    `ref`/`test`: [B, H, W, C] (ComfyUI IMAGE, `channels_last=True`) or [B, C, H, W]; a 5-D video
    tensor [B, T, H, W, C] is flattened to frames. Frames are processed `batch_chunk` at a time in
    fp32 so a long video never needs all of its filtered maps at once. Images smaller than the
    window use a window as large as the smaller side.
    """
    _check_pair(ref, test)
    if ref.dim() == 5:  # video: fold time into the batch
        ref = ref.reshape(-1, *ref.shape[-3:])
        test = test.reshape(-1, *test.shape[-3:])
    if ref.dim() == 3:
        ref, test = ref.unsqueeze(0), test.unsqueeze(0)
    if ref.dim() != 4:
        raise ValueError(f"ssim expects [B,H,W,C] or [B,C,H,W] images, got shape {tuple(ref.shape)}")
    if channels_last:
        ref, test = ref.movedim(-1, 1), test.movedim(-1, 1)
    _, c, h, w = ref.shape
    size = min(window, h, w)
    g = _gaussian_window(size, sigma, ref.device)
    kx = g.view(1, 1, 1, size).expand(c, 1, 1, size)
    ky = g.view(1, 1, size, 1).expand(c, 1, size, 1)

    def blur(x: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, kx, groups=c), ky, groups=c)

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    total = 0.0
    count = 0
    for start in range(0, ref.shape[0], batch_chunk):
        x = ref[start : start + batch_chunk].float()
        y = test[start : start + batch_chunk].to(x.device).float()
        mu_x, mu_y = blur(x), blur(y)
        sxx = blur(x * x) - mu_x * mu_x
        syy = blur(y * y) - mu_y * mu_y
        sxy = blur(x * y) - mu_x * mu_y
        num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
        den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
        smap = num / den
        total += float(smap.double().sum())
        count += smap.numel()
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# Fake quantization (quantize then dequantize, fp32) through the formats' own reference code
# ---------------------------------------------------------------------------------------------

#: Weight variants the bench and the activation statistics compare.
WEIGHT_VARIANTS = ("fp8_channel", "fp8_tensor", "mxfp4_even", "mxfp4_floor", "mxfp4_ceil")


def fake_quantize_weight(w: Tensor, variant: str) -> Tensor:
    """Quantize-dequantize a [N, K] weight with one of WEIGHT_VARIANTS; returns fp32."""
    from . import fp8, mxfp4  # A's modules; imported late so the metrics work on their own

    w = w.float()
    if variant.startswith("fp8_"):
        q, s = fp8.quantize_weight(w, granularity=variant[4:])
        return fp8.dequantize(q, s, torch.float32)
    if variant.startswith("mxfp4_"):
        codes, scales = mxfp4.quantize(w, rounding=variant[6:])
        return mxfp4.dequantize(codes, scales, torch.float32)
    raise ValueError(f"unknown weight variant {variant!r}; known: {', '.join(WEIGHT_VARIANTS)}")


def fake_quantize_activation(x: Tensor, bits: int) -> Tensor:
    """Quantize-dequantize activations [..., K] as the W8A8 / W4A4 paths do: 8 = FP8 e4m3 with a
    dynamic per-token scale; 4 = MXFP4 with AITER's `dynamic_mxfp4_quant` rounding ("even")."""
    from . import fp8, mxfp4

    x = x.float()
    if bits == 8:
        q, s = fp8.quantize_activation(x)
        return q.float() * s
    if bits == 4:
        codes, scales = mxfp4.quantize(x, rounding="even")
        return mxfp4.dequantize(codes, scales, torch.float32)
    raise ValueError(f"activation bits must be 8 or 4, got {bits}")




# ---------------------------------------------------------------------------------------------
# Weight SQNR as the loader measures it
# ---------------------------------------------------------------------------------------------


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
    from .formats import QuantizedWeight

    idx = sample_rows(w.shape[0], rows)
    if idx is None:
        return sqnr_db(w, qw.dequantize(torch.float32))
    idx = idx.to(qw.qdata.device)
    per_row = qw.scale.dim() > 0 and qw.scale.shape[0] == w.shape[0]
    scale = qw.scale.index_select(0, idx) if per_row else qw.scale  # a per-tensor scale stays
    part = QuantizedWeight(qw.format, qw.qdata.index_select(0, idx), scale, (int(idx.numel()), qw.shape[1]))
    return sqnr_db(w.index_select(0, idx.to(w.device)), part.dequantize(torch.float32))


def estimate_weight_sqnr_db(w: Tensor, format: str, rows: int | None = 256) -> float:
    """SQNR (dB) that quantizing `w` [N, K] with `format` would give, from `rows` evenly spaced rows
    only (quantized together with the row holding the tensor's amax, so a per-tensor scale is the
    full tensor's). Exact per row for every format here (they are row-local); `rows=None`
    quantizes the whole weight. Costs about rows/N of a real quantization."""
    from .formats import get_format

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
    from .patterns import strip_prefix

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
    from .patterns import strip_prefix

    total = 0
    for key, shape in shapes.items():
        if key.endswith(".weight") and plan.decision(strip_prefix(key[: -len(".weight")])) is not None:
            continue
        total += math.prod(shape) * dtype_bytes
    return total




# The sensitivity rules and the activation statistics live in their own modules; they are
# re-exported here so that `quant.quality` stays the one import point for quality tools.
from .activation_stats import (  # noqa: E402
    ACTIVATION_SCHEMES,
    ActivationStats,
    ActivationStatsCollector,
    layer_activation_stats,
)
from .sensitivity import (  # noqa: E402
    SensitivityRule,
    apply_sensitivity,
    choose_sensitive_layers,
    ignore_lines,
    parse_sensitivity_rule,
    plan_with_sensitivity,
)

__all__ = [
    "ACTIVATION_SCHEMES",
    "WEIGHT_VARIANTS",
    "ActivationStats",
    "ActivationStatsCollector",
    "SensitivityRule",
    "apply_sensitivity",
    "channel_sqnr_db",
    "choose_sensitive_layers",
    "estimate_weight_sqnr_db",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "ignore_lines",
    "layer_activation_stats",
    "measure_weight_sqnr",
    "mse",
    "other_param_bytes",
    "parse_sensitivity_rule",
    "plan_with_sensitivity",
    "psnr_db",
    "quantized_weight_sqnr_db",
    "relative_l2",
    "sample_rows",
    "sqnr_db",
    "ssim",
    "weight_sqnr_db",
]
