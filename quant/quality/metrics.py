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

import torch
from torch import Tensor

# Elements per chunk: 4 Mi fp32 elements = 16 MiB of temporaries per operand.
CHUNK = 1 << 22  # elements per fp32 partial sum (then summed in fp64)


def _check_pair(ref: Tensor, test: Tensor) -> None:
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs test {tuple(test.shape)}")


def signal_noise_sums(ref: Tensor, test: Tensor) -> Tensor:
    """(Σref², Σ(ref−test)²) as float64 [2] on ref's device, with no synchronisation (a loader
    queues one per layer and reads them together): fp32 per chunk, fp64 across chunks."""
    _check_pair(ref, test)
    r = ref.detach().reshape(-1)
    t = test.detach().reshape(-1)
    if t.device != r.device:
        t = t.to(r.device)
    sums = torch.zeros(2, dtype=torch.float64, device=r.device)
    for start in range(0, r.numel(), CHUNK):
        rc = r[start : start + CHUNK].float()
        d = rc - t[start : start + CHUNK].float()
        # dot products: one BLAS pass each, fp32 accumulation (no x*x temporaries)
        sums += torch.stack([torch.dot(rc, rc), torch.dot(d, d)]).double()
    return sums


def _signal_and_noise(ref: Tensor, test: Tensor) -> tuple[float, float]:
    """Return (sum ref^2, sum (ref - test)^2), fp32 per chunk, fp64 across chunks."""
    signal, noise = signal_noise_sums(ref, test).tolist()
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


__all__ = [
    "CHUNK",
    "channel_sqnr_db",
    "mse",
    "psnr_db",
    "relative_l2",
    "sqnr_db",
    "signal_noise_sums",
    "sqnr_from_sums",
    "ssim",
    "weight_sqnr_db",
]
