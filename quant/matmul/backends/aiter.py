"""AMD Instinct paths: AITER's MXFP4 W4A4 GEMM on gfx950 (MI350/MI355) and the seam around it.

AITER is AMD's `amd-aiter` package (import name `aiter`, ROCm only). PyPI's `aiter` is an
unrelated project: it is never a dependency, and `aiter_module()` refuses a module named `aiter`
that lacks AITER's ops. Everything is imported lazily; on machines without it the backend's
`check` says why and the reference path runs.

Targets amd-aiter v0.1.12 and later; the signatures below are those of AITER tags v0.1.12
through v0.1.20.post1 (github.com/ROCm/aiter), where they do not change in the parts used here:
  aiter.utility.fp4_utils.dynamic_mxfp4_quant(x, scaling_mode="even", shuffle=False)
      -> (codes fp4x2 [M, K/2], scales fp8_e8m0: [M, K/32], or with shuffle=True padded to
      [ceil256(M), ceil8(K/32)] and e8m0-shuffled). From v0.1.12 it rounds elements ties to even,
      i.e. exactly like this pack's "mxfp4" format (rounding "even"); earlier releases round ties
      away, which is why older ones are refused. (`aiter.ops.triton.quant.dynamic_mxfp4_quant`
      is another function, `(x, scaling_mode="even")`, without `shuffle`: not used.)
  aiter.ops.shuffle.shuffle_weight(x, layout=(16, 16), use_int4=False, ...)
  aiter.utility.fp4_utils.e8m0_shuffle(scale)
  aiter.gemm_a4w4(A, B, A_scale, B_scale, bias=None, dtype=bf16, alpha=1.0, beta=0.0,
      bpreshuffle=True, ...) -> [M, N] (no `out` argument since v0.1.9).
`aiter_module()` checks that these accept the keywords used here before the backend is chosen.

Call sequence on gfx950 (as AITER's own op_tests/test_gemm_a4w4.py runs it):
  weights (once, cached per weight): pad N to a multiple of 16 and K to a multiple of 64,
      `shuffle_weight(codes, layout=(16, 16))`, `e8m0_shuffle(scales)`;
  each call: pad x's K, `dynamic_mxfp4_quant(x, shuffle=True)`,
      `gemm_a4w4(x_codes, w_shuffled, x_scales, w_scales, dtype=bf16, bpreshuffle=True)` ->
      bf16 [M, N_pad]; slice N, add the bias after, cast to x.dtype.
The layout functions below are the pack's own plain-PyTorch versions of AITER's (same
permutations as aiter/ops/shuffle.py and aiter/utility/fp4_utils.py at the tags above); the tests
run the whole sequence against a stub `aiter` with AITER's exact signatures built on them. NOT YET
RUN ON AN MI350: no AMD GPU was available while this was written.

gfx942 (MI300) has no FP4 compute; it runs FP8 e4m3fnuz through torch._scaled_mm (backends
"scaled_mm" and "triton_fp8", with the "fp8_e4m3fnuz" weight format).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import logging
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...errors import BackendUnavailableError
from ...formats import QuantizedWeight, WeightFormat
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


# ---------------------------------------------------------------- the real AITER, lazily
MIN_VERSION = (0, 1, 12)  # first release whose dynamic_mxfp4_quant rounds ties to even

# (where, function, keywords this module passes to it)
_NEEDED = (
    ("aiter.utility.fp4_utils", "dynamic_mxfp4_quant", ("shuffle",)),
    ("aiter.utility.fp4_utils", "e8m0_shuffle", ()),
    ("aiter.ops.shuffle", "shuffle_weight", ("layout",)),
    ("aiter", "gemm_a4w4", ("dtype", "bpreshuffle")),
)


@dataclass(frozen=True)
class AiterOps:
    """The AITER functions the linear calls, exactly as AITER defines them, and its dtypes."""

    dynamic_mxfp4_quant: Callable
    e8m0_shuffle: Callable
    shuffle_weight: Callable
    gemm_a4w4: Callable
    fp4x2: torch.dtype  # aiter.dtypes.fp4x2: torch.float4_e2m1fn_x2 where torch has it
    fp8_e8m0: torch.dtype  # aiter.dtypes.fp8_e8m0: torch.float8_e8m0fnu where torch has it


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("amd-aiter")
    except Exception:  # not installed as a distribution (e.g. a source checkout on sys.path)
        return None


def _version_tuple(v: str) -> tuple[int, ...] | None:
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", v)
    return tuple(int(g) for g in m.groups()) if m else None


def _takes(fn: Callable, keywords: tuple[str, ...]) -> bool:
    """Whether fn's signature names `keywords`. A wrapper taking **kwargs passes: AITER wraps some
    ops that way (gemm_a4w4 under `torch_compile_guard` in aiter/jit/utils/torch_guard.py,
    v0.1.20.post1), and the custom op behind it then checks the keywords when called."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return all(k in params for k in keywords)


@functools.cache
def aiter_status() -> tuple[AiterOps | None, str]:
    """(AMD's AITER ops, "") or (None, why not); the reason is logged once."""
    try:
        aiter = importlib.import_module("aiter")
    except Exception as e:  # ImportError, or a ROCm library that fails to load
        log.debug("AITER not importable: %s", e)
        return None, "AMD's amd-aiter is not installed (PyPI's 'aiter' is unrelated)"
    if not hasattr(aiter, "gemm_a4w4"):
        why = (
            "a module named 'aiter' was found but it is not AMD's amd-aiter (no gemm_a4w4); "
            "PyPI's 'aiter' is unrelated"
        )
        log.warning(why)
        return None, why
    version = _installed_version()
    vt = _version_tuple(version) if version else None
    if vt is not None and vt < MIN_VERSION:
        why = (
            f"amd-aiter {version} is older than 0.1.12: its dynamic_mxfp4_quant rounds ties away from zero "
            "and its gemm_a4w4 signature may differ; this path targets amd-aiter 0.1.12 or later"
        )
        log.warning(why)
        return None, why
    fns = {}
    try:
        for where, name, keywords in _NEEDED:
            fn = getattr(importlib.import_module(where), name)
            if not _takes(fn, keywords):
                raise TypeError(f"{where}.{name}{inspect.signature(fn)} does not take {', '.join(keywords)}")
            fns[name] = fn
        dtypes = aiter.dtypes
        ops = AiterOps(**fns, fp4x2=dtypes.fp4x2, fp8_e8m0=dtypes.fp8_e8m0)
    except Exception as e:
        found = version or "(version unknown)"
        why = f"AITER {found} found but its MXFP4 API is not the one targeted (v0.1.12+): {e}"
        log.warning(why)
        return None, why
    return ops, ""


def aiter_module() -> AiterOps | None:
    """AMD's AITER ops, or None when it is not installed, not AMD's, or not a targeted release."""
    return aiter_status()[0]


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


def prepare_weight(qw: QuantizedWeight, ops: AiterOps) -> AiterWeight:
    """Pad and shuffle an MXFP4 weight for gemm_a4w4 (cached per weight tensor)."""
    key = id(qw.qdata)
    hit = _PREPARED.get(key)
    if hit is not None and hit[0]() is qw.qdata and hit[1] is ops:
        return hit[2]
    n, k = qw.shape
    n_pad, k_pad = _ceil(n, N_MULTIPLE), _ceil(k, K_MULTIPLE)
    codes, scales = pad_codes(qw.qdata, qw.scale, n_pad, k_pad)
    # AITER's own dtypes, as its quantizer returns them for activations
    shuffled = ops.shuffle_weight(codes.view(ops.fp4x2), layout=(16, 16))
    prepared = AiterWeight(shuffled, ops.e8m0_shuffle(scales.view(ops.fp8_e8m0)), n, k, n_pad, k_pad)
    _PREPARED[key] = (weakref.ref(qw.qdata), ops, prepared)
    weakref.finalize(qw.qdata, _PREPARED.pop, key, None)
    return prepared


def aiter_linear(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, ops: AiterOps | None = None
) -> torch.Tensor:
    """MXFP4 W4A4 linear through AITER (or the given `ops`): x [..., K] -> [..., N]."""
    ops = ops or aiter_module()
    if ops is None:
        raise BackendUnavailableError(f"AITER cannot run: {aiter_status()[1]}")
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
        return False, aiter_status()[1] or "AMD's amd-aiter is not installed (PyPI's 'aiter' is unrelated)"
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
