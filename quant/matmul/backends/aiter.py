"""AMD Instinct paths: AITER's MXFP4 W4A4 GEMM on gfx950 (MI350/MI355) and the seam around it.

AITER is AMD's `amd-aiter` package (import name `aiter`, ROCm only). PyPI's `aiter` is an
unrelated project: it is never a dependency, and `aiter_module()` refuses a module named `aiter`
that lacks AITER's ops. Everything is imported lazily; on machines without it the backend's
`check` says why and the reference path runs.

Call sequence on gfx950 (as AITER's own op tests and its users run it):
  weights (once, cached per weight): pad N to a multiple of 16 and K to a multiple of 64,
      `shuffle_weight(codes, layout=(16, 16))`, `e8m0_shuffle(scales)` (scales padded to
      [ceil256(N), ceil8(K/32)]);
  each call: pad x's K, `dynamic_mxfp4_quant(x)` (activation codes + E8M0 scales, AITER's
      rounding = this pack's "mxfp4" format), `e8m0_shuffle(x_scales)`,
      `gemm_a4w4(x_codes, w_shuffled, x_scales_shuffled, w_scales_shuffled, dtype=bf16,
      bpreshuffle=True)` -> bf16 [M, N_pad]; slice N, add the bias after, cast to x.dtype.
The layouts below follow AITER's documented Python definitions (aiter/ops/shuffle.py,
aiter/utility/fp4_utils.py); `*_emulated` functions reproduce AITER's ops in plain PyTorch, and
the tests check the whole sequence against them. NOT YET RUN ON AN MI350: no AMD GPU was
available while this was written.

gfx942 (MI300) has no FP4 compute; it runs FP8 e4m3fnuz through torch._scaled_mm (quant/backends.py
"scaled_mm" and "triton_fp8", with the "fp8_e4m3fnuz" weight format).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import weakref
from dataclasses import dataclass

import torch

from ...errors import BackendUnavailableError
from ...formats import QuantizedWeight, WeightFormat, mxfp4
from ..registry import Backend, DeviceInfo, register_backend

log = logging.getLogger(__name__)

N_MULTIPLE = 16  # gemm_a4w4: N % 16 == 0
K_MULTIPLE = 64  # gemm_a4w4: K % 64 == 0 (32 packed bytes per 16-byte shuffle chunk pair)
SCALE_ROWS_MULTIPLE = 256  # e8m0_shuffle pads scale rows to 256 ...
SCALE_COLS_MULTIPLE = 8  # ... and scale columns (K/32) to 8
E8M0_ONE = 127  # scale byte of 2**0, used for padding


def _ceil(v: int, m: int) -> int:
    return (v + m - 1) // m * m


# ---------------------------------------------------------------- layouts (pure PyTorch)
def shuffle_weight(codes: torch.Tensor, layout: tuple[int, int] = (16, 16)) -> torch.Tensor:
    """AITER's `shuffle_weight` for packed uint8 codes [N, K/2]: 16-row x 32-byte tiles, each
    stored as two 16-byte halves, rows interleaved inside a half (view (-1, N/16, 16, Kb/32, 2,
    16), permute (0, 1, 3, 4, 2, 5))."""
    bn, bk = layout[0], layout[1] * 2
    kpack = 16 // codes.element_size()
    n, kb = codes.shape[-2], codes.shape[-1]
    if n % bn or kb % bk:
        raise ValueError(
            f"shuffle_weight needs N % {bn} == 0 and packed K % {bk} == 0, got {tuple(codes.shape)}"
        )
    x = codes.reshape(-1, n // bn, bn, kb // bk, bk // kpack, kpack).permute(0, 1, 3, 4, 2, 5)
    return x.contiguous().view(codes.shape)


def unshuffle_weight(codes: torch.Tensor, layout: tuple[int, int] = (16, 16)) -> torch.Tensor:
    bn, bk = layout[0], layout[1] * 2
    kpack = 16 // codes.element_size()
    n, kb = codes.shape[-2], codes.shape[-1]
    x = codes.reshape(-1, n // bn, kb // bk, bk // kpack, bn, kpack).permute(0, 1, 4, 2, 3, 5)
    return x.contiguous().view(codes.shape)


def e8m0_shuffle(scales: torch.Tensor, fill: int = E8M0_ONE) -> torch.Tensor:
    """AITER's `e8m0_shuffle`: pad [M, K/32] to [ceil256(M), ceil8(K/32)], then view
    (M/32, 2, 16, S/8, 2, 4) permuted (0, 3, 5, 2, 4, 1). AITER leaves the padding uninitialized;
    here it is `fill` (scale 1.0, multiplying zero codes), so results never depend on garbage."""
    m, s = scales.shape
    sm, sn = _ceil(m, SCALE_ROWS_MULTIPLE), _ceil(s, SCALE_COLS_MULTIPLE)
    padded = torch.full((sm, sn), fill, dtype=torch.uint8, device=scales.device)
    padded[:m, :s] = scales.view(torch.uint8)
    x = padded.view(sm // 32, 2, 16, sn // 8, 2, 4).permute(0, 3, 5, 2, 4, 1)
    return x.contiguous().view(sm, sn)


def e8m0_unshuffle(shuffled: torch.Tensor, m: int, s: int) -> torch.Tensor:
    sm, sn = shuffled.shape
    x = shuffled.view(torch.uint8).reshape(sm // 32, sn // 8, 4, 16, 2, 2).permute(0, 5, 3, 1, 4, 2)
    return x.contiguous().view(sm, sn)[:m, :s]


def pad_codes(codes: torch.Tensor, scales: torch.Tensor, n_pad: int, k_pad: int):
    """Zero codes / unit scales up to [n_pad, k_pad/2] and [n_pad, k_pad/32]."""
    n, kh = codes.shape
    if (n, kh * 2) == (n_pad, k_pad):
        return codes, scales
    c = torch.zeros((n_pad, k_pad // 2), dtype=torch.uint8, device=codes.device)
    c[:n, :kh] = codes
    s = torch.full((n_pad, k_pad // 32), E8M0_ONE, dtype=torch.uint8, device=scales.device)
    s[:n, : scales.shape[1]] = scales
    return c, s


# ---------------------------------------------------------------- emulation of AITER's ops
def dynamic_mxfp4_quant_emulated(x: torch.Tensor, shuffle: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """AITER's dynamic_mxfp4_quant in PyTorch: codes [M, K/2]; scales [ceil256(M), ceil8(K/32)]
    (e8m0-shuffled when `shuffle`, else row-major with the same padding)."""
    codes, scales = mxfp4.quantize(x, "even", check_finite=False)
    if shuffle:
        return codes, e8m0_shuffle(scales)
    m, s = scales.shape
    out = torch.full(
        (_ceil(m, SCALE_ROWS_MULTIPLE), _ceil(s, SCALE_COLS_MULTIPLE)),
        E8M0_ONE,
        dtype=torch.uint8,
        device=x.device,
    )
    out[:m, :s] = scales
    return codes, out


def gemm_a4w4_emulated(a_codes, w_shuffled, a_scales_shuffled, w_scales_shuffled, dtype=torch.bfloat16):
    """AITER's gemm_a4w4(bpreshuffle=True) in PyTorch: [M, K/2] x shuffled [N, K/2] -> [M, N]."""
    m, kh = a_codes.shape
    n = w_shuffled.shape[0]
    k = kh * 2
    w_codes = unshuffle_weight(w_shuffled.view(torch.uint8))
    a_s = e8m0_unshuffle(a_scales_shuffled, m, k // 32)
    w_s = e8m0_unshuffle(w_scales_shuffled, n, k // 32)
    a = mxfp4.dequantize(a_codes.view(torch.uint8), a_s, torch.float32)
    w = mxfp4.dequantize(w_codes, w_s, torch.float32)
    return (a @ w.t()).to(dtype)


class EmulatedAiter:
    """An object with AITER's API surface backed by the emulation (tests; never chosen at run time)."""

    dynamic_mxfp4_quant = staticmethod(dynamic_mxfp4_quant_emulated)
    shuffle_weight = staticmethod(shuffle_weight)
    e8m0_shuffle = staticmethod(e8m0_shuffle)

    @staticmethod
    def gemm_a4w4(a, b, a_scale, b_scale, dtype=torch.bfloat16, bpreshuffle=True):
        if not bpreshuffle:
            raise ValueError("emulation implements bpreshuffle=True only")
        return gemm_a4w4_emulated(a, b, a_scale, b_scale, dtype)


# ---------------------------------------------------------------- the real AITER, lazily
@functools.cache
def aiter_module():
    """AMD's AITER as an object with dynamic_mxfp4_quant / shuffle_weight / e8m0_shuffle /
    gemm_a4w4, or None (with the reason logged once) when it is not installed or not AMD's."""
    try:
        aiter = importlib.import_module("aiter")
    except Exception as e:  # ImportError, or a ROCm library that fails to load
        log.debug("AITER not importable: %s", e)
        return None
    if not hasattr(aiter, "gemm_a4w4"):
        log.warning(
            "a module named 'aiter' was found but it is not AMD's amd-aiter (no gemm_a4w4); "
            "PyPI's 'aiter' is an unrelated package"
        )
        return None
    try:
        quant = importlib.import_module("aiter.ops.triton.quant").dynamic_mxfp4_quant
        fp4 = importlib.import_module("aiter.utility.fp4_utils")
        shuffle = importlib.import_module("aiter.ops.shuffle").shuffle_weight
    except Exception as e:
        log.warning("AITER found but its MXFP4 helpers did not import: %s", e)
        return None
    return _RealAiter(aiter, quant, shuffle, fp4.e8m0_shuffle)


class _RealAiter:
    def __init__(self, aiter, quant, shuffle, e8m0_shuffle_fn):
        self._aiter = aiter
        self.dynamic_mxfp4_quant = quant
        self.shuffle_weight = shuffle
        self.e8m0_shuffle = e8m0_shuffle_fn
        self._needs_out = "out" in inspect.signature(aiter.gemm_a4w4).parameters

    def gemm_a4w4(self, a, b, a_scale, b_scale, dtype=torch.bfloat16, bpreshuffle=True):
        dt = self._aiter.dtypes
        args = (a.view(dt.fp4x2), b.view(dt.fp4x2), a_scale.view(dt.fp8_e8m0), b_scale.view(dt.fp8_e8m0))
        if self._needs_out:  # older releases: gemm_a4w4(A, B, A_scale, B_scale, out, bias, ...)
            out = torch.empty((a.shape[0], b.shape[0]), dtype=dtype, device=a.device)
            return self._aiter.gemm_a4w4(*args, out, bpreshuffle=bpreshuffle)
        return self._aiter.gemm_a4w4(*args, dtype=dtype, bpreshuffle=bpreshuffle)


# ---------------------------------------------------------------- the linear
@dataclass(frozen=True)
class AiterWeight:
    codes: torch.Tensor  # shuffled, [n_pad, k_pad/2]
    scales: torch.Tensor  # e8m0-shuffled, [ceil256(n_pad), ceil8(k_pad/32)]
    n: int
    k: int
    n_pad: int
    k_pad: int


# id(weight tensor) -> (weakref to it, ops, prepared); entries die with their weight (tensors
# compare elementwise, so they cannot be WeakKeyDictionary keys).
_PREPARED: dict[int, tuple] = {}


def prepare_weight(qw: QuantizedWeight, ops) -> AiterWeight:
    """Pad and shuffle an MXFP4 weight for gemm_a4w4 (cached per weight tensor)."""
    key = id(qw.qdata)
    hit = _PREPARED.get(key)
    if hit is not None and hit[0]() is qw.qdata and hit[1] is ops:
        return hit[2]
    n, k = qw.shape
    n_pad, k_pad = _ceil(n, N_MULTIPLE), _ceil(k, K_MULTIPLE)
    codes, scales = pad_codes(qw.qdata, qw.scale, n_pad, k_pad)
    prepared = AiterWeight(ops.shuffle_weight(codes), ops.e8m0_shuffle(scales), n, k, n_pad, k_pad)
    _PREPARED[key] = (weakref.ref(qw.qdata), ops, prepared)
    weakref.finalize(qw.qdata, _PREPARED.pop, key, None)
    return prepared


def aiter_linear(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, ops=None
) -> torch.Tensor:
    """MXFP4 W4A4 linear through AITER (or `ops`, e.g. EmulatedAiter): x [..., K] -> [..., N]."""
    ops = ops or aiter_module()
    if ops is None:
        raise BackendUnavailableError("AITER is not installed: install AMD's amd-aiter (ROCm, gfx950)")
    pw = prepare_weight(qw, ops)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*lead, pw.n))
    if pw.k_pad != pw.k:
        x2 = torch.nn.functional.pad(x2, (0, pw.k_pad - pw.k))
    xq, xs = ops.dynamic_mxfp4_quant(x2.contiguous(), shuffle=True)
    y = ops.gemm_a4w4(xq, pw.codes, xs, pw.scales, dtype=torch.bfloat16, bpreshuffle=True)
    y = y[:m, : pw.n]
    if bias is not None:  # gemm_a4w4's bias argument is fp32 [1, N] in some releases only: add after
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*lead, pw.n)


# ---------------------------------------------------------------- backend registration
def _aiter_check(info: DeviceInfo, fmt: WeightFormat) -> tuple[bool, str]:
    if info.vendor != "amd":
        return False, f"AITER is for AMD Instinct GPUs, device is {info.describe()}"
    if info.arch != "gfx950":
        return False, f"gemm_a4w4 needs gfx950 (MI350/MI355), device is {info.arch}"
    if getattr(fmt, "rounding", "even") != "even":
        return False, "AITER quantizes activations with its own rounding; use format 'mxfp4'"
    if aiter_module() is None:
        return False, "AMD's amd-aiter is not installed (PyPI's 'aiter' is unrelated)"
    return True, "gfx950 MXFP4 matrix cores via AITER gemm_a4w4 (W4A4; not yet run on an MI350)"


def _aiter_run(x, qw, bias, compute):
    return aiter_linear(x, qw, bias)


BACKEND = Backend(
    "aiter_a4w4",
    ("mxfp4",),
    ("w4a4",),
    _aiter_run,
    _aiter_check,
    priority=70,
    package="amd-aiter (AMD's AITER for ROCm; not PyPI's 'aiter')",
)
register_backend(BACKEND)
