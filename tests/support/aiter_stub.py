"""A stand-in for AMD's `aiter` package (amd-aiter), for tests on machines without ROCm.

Every public function here has exactly the signature (parameter names, order, defaults) of the
function of the same name in AITER tag v0.1.20.post1 (github.com/ROCm/aiter; the same at main
v0.1.20-46-ge4048607a5), so that a call with a keyword AITER does not take fails here as it
would on a real machine:
  aiter/ops/gemm_op_a4w4.py           gemm_a4w4(A, B, A_scale, B_scale, bias=None, dtype=bf16,
                                                alpha=1.0, beta=0.0, bpreshuffle=True,
                                                apreshuffle=False, global_A_scale=None,
                                                global_B_scale=None)   (aiter.gemm_a4w4)
  aiter/utility/fp4_utils.py          dynamic_mxfp4_quant(x, scaling_mode="even", shuffle=False)
                                      e8m0_shuffle(scale)
  aiter/ops/shuffle.py                shuffle_weight(x, layout=(16, 16), use_int4=False,
                                                     is_guinterleave=False, gate_up=False,
                                                     pad_k_to=0)
  aiter/ops/triton/quant/quant.py     dynamic_mxfp4_quant(x, scaling_mode="even")  (no shuffle)
  aiter/utility/dtypes.py             fp4x2, fp8_e8m0, bf16, fp32
The bodies are the pack's plain-PyTorch emulation (quant.formats.mxfp4 and the layout functions
of quant.matmul.backends.aiter), not AITER's code. Where AITER leaves padding uninitialized
(torch.empty), the stub fills it with 0xFF (E8M0 NaN), so a result that depended on it would
show. Options the pack never uses raise NotImplementedError rather than guess.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import Tensor

from quant.formats import mxfp4
from quant.matmul.backends import aiter as layouts

TAG = "v0.1.20.post1"
POISON = 0xFF


# ---------------------------------------------------------------- aiter.utility.dtypes
dtypes = types.ModuleType("aiter.utility.dtypes")
dtypes.fp4x2 = getattr(torch, "float4_e2m1fn_x2", torch.uint8)
dtypes.fp8_e8m0 = getattr(torch, "float8_e8m0fnu", torch.uint8)
dtypes.bf16 = torch.bfloat16
dtypes.fp32 = torch.float32


# ---------------------------------------------------------------- aiter.utility.fp4_utils
def e8m0_shuffle(scale):
    if scale is None:
        return scale
    if scale.dtype == torch.float32:
        return scale
    assert scale.ndim == 2, "scale must be a 2D tensor"
    return layouts.e8m0_shuffle(scale.view(torch.uint8), fill=POISON).view(scale.dtype)


def dynamic_mxfp4_quant(
    x: torch.Tensor, scaling_mode: str = "even", shuffle: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    # AITER ignores scaling_mode (its kernel always gets SCALING_MODE=0); so does the stub.
    m, n = x.shape
    assert (n // 2) % 2 == 0
    codes, scales = mxfp4.quantize(x, "even", check_finite=False)
    if shuffle:  # padded to [ceil256(M), ceil8(N/32)] and shuffled; trimmed otherwise
        scales = layouts.e8m0_shuffle(scales, fill=POISON)
    return codes.view(dtypes.fp4x2), scales.view(dtypes.fp8_e8m0)


# ---------------------------------------------------------------- aiter.ops.shuffle
def shuffle_weight(
    x: torch.Tensor,
    layout=(16, 16),
    use_int4=False,
    is_guinterleave=False,
    gate_up: bool = False,
    pad_k_to: int = 0,
) -> torch.Tensor:
    if use_int4 or is_guinterleave or gate_up or pad_k_to:
        raise NotImplementedError("stub: only the plain (16, 16) MXFP4 weight shuffle is emulated")
    x_type = x.dtype
    return layouts.shuffle_weight(x.view(torch.uint8), layout).view(x_type)


# ---------------------------------------------------------------- aiter.gemm_a4w4
def gemm_a4w4(
    A: Tensor,
    B: Tensor,
    A_scale: Tensor,
    B_scale: Tensor,
    bias: Tensor | None = None,
    dtype: torch.dtype = dtypes.bf16,
    alpha: float | None = 1.0,
    beta: float | None = 0.0,
    bpreshuffle: bool | None = True,
    apreshuffle: bool | None = False,
    global_A_scale: Tensor | None = None,
    global_B_scale: Tensor | None = None,
) -> torch.Tensor:
    if not bpreshuffle or apreshuffle or global_A_scale is not None or global_B_scale is not None:
        raise NotImplementedError("stub: MXFP4 with a pre-shuffled B only")
    if bias is not None or alpha != 1.0 or beta != 0.0:
        raise NotImplementedError("stub: no bias/alpha/beta epilogue")
    for t in (A, B, A_scale, B_scale):
        assert t.element_size() == 1, t.dtype
    m, kh = A.shape
    n, k = B.shape[0], kh * 2
    assert B.shape == (n, kh) and n % layouts.N_MULTIPLE == 0 and k % layouts.K_MULTIPLE == 0
    w_codes = layouts.unshuffle_weight(B.view(torch.uint8))
    a_s = layouts.e8m0_unshuffle(A_scale.view(torch.uint8), m, k // 32)
    w_s = layouts.e8m0_unshuffle(B_scale.view(torch.uint8), n, k // 32)
    a = mxfp4.dequantize(A.view(torch.uint8), a_s, torch.float32)
    w = mxfp4.dequantize(w_codes, w_s, torch.float32)
    return (a @ w.t()).to(dtype)


# ---------------------------------------------------------------- aiter.ops.triton.quant
def triton_dynamic_mxfp4_quant(
    x: torch.Tensor, scaling_mode: str = "even"
) -> tuple[torch.Tensor, torch.Tensor]:
    """aiter.ops.triton.quant.dynamic_mxfp4_quant: codes uint8 [M, N/2], scales uint8 [M, N/32]
    (a transposed view of an [N/32, M] buffer)."""
    codes, scales = mxfp4.quantize(x, "even", check_finite=False)
    return codes, scales.t().contiguous().t()


triton_dynamic_mxfp4_quant.__name__ = "dynamic_mxfp4_quant"


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so that submodules import
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def modules() -> dict[str, types.ModuleType]:
    """sys.modules entries that make `import aiter` and its submodules resolve to this stub."""
    fp4_utils = _module(
        "aiter.utility.fp4_utils", dynamic_mxfp4_quant=dynamic_mxfp4_quant, e8m0_shuffle=e8m0_shuffle
    )
    utility = _module("aiter.utility", fp4_utils=fp4_utils, dtypes=dtypes)
    shuffle = _module("aiter.ops.shuffle", shuffle_weight=shuffle_weight)
    tquant = _module("aiter.ops.triton.quant", dynamic_mxfp4_quant=triton_dynamic_mxfp4_quant)
    triton = _module("aiter.ops.triton", quant=tquant)
    ops = _module("aiter.ops", shuffle=shuffle, triton=triton)
    aiter = _module("aiter", gemm_a4w4=gemm_a4w4, dtypes=dtypes, ops=ops, utility=utility)
    return {
        "aiter": aiter,
        "aiter.ops": ops,
        "aiter.ops.shuffle": shuffle,
        "aiter.ops.triton": triton,
        "aiter.ops.triton.quant": tquant,
        "aiter.utility": utility,
        "aiter.utility.dtypes": dtypes,
        "aiter.utility.fp4_utils": fp4_utils,
    }


def install(monkeypatch) -> dict[str, types.ModuleType]:
    """Put the stub in sys.modules for one test (pytest's monkeypatch undoes it)."""
    mods = modules()
    for name in [n for n in sys.modules if n == "aiter" or n.startswith("aiter.")]:
        monkeypatch.delitem(sys.modules, name)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return mods
