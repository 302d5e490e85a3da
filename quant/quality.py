"""Quality metrics: how far a quantized weight, layer output or image is from its reference.

All metrics accumulate in fp32 over bounded chunks (so a 5120x13824 bf16 weight never needs a
full fp32 copy) and sum the chunk totals in fp64. They run on whatever device the tensors are on.
Conventions: SQNR/PSNR are `inf` when the test tensor equals the reference exactly; SQNR is
`-inf` when the reference is all zeros but the test is not (no signal, some noise).
"""

from __future__ import annotations

import math

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
        tc = t[start : start + _CHUNK].float()
        signal += float(torch.sum(rc * rc))
        d = rc - tc
        noise += float(torch.sum(d * d))
    return signal, noise


def _sqnr_from(signal: float, noise: float) -> float:
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
    return _sqnr_from(*_signal_and_noise(ref, test))


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
