"""What the installed PyTorch and Triton can do on the CPU, probed once, so a test of a path the
installed release cannot run on the CPU skips with the reason instead of failing.

The pack runs on a range of torch releases, and CI runs the unit tests on the oldest and the newest
(see .ci/run). Older releases lack CPU pieces the GPU paths do not need: a CPU `torch._scaled_mm`
with row-wise scales, and some of what Triton's interpreter (TRITON_INTERPRET=1, how the kernels run
on the CPU) covers. Each probe runs the smallest call that needs the feature; nothing here decides
what the pack itself does.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def has_cpu_scaled_mm() -> bool:
    """Whether this PyTorch has a CPU `torch._scaled_mm` with row-wise scales (the kernel tests of
    the `_scaled_mm` paths skip on CPU without it)."""
    try:
        a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
        one = torch.ones(16, 1)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one.t().contiguous(), out_dtype=torch.bfloat16)
        return True
    except Exception:
        return False


def _probe_e4m3fnuz() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def store_cast(x_ptr, y_ptr):
        offs = tl.arange(0, 16)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(y_ptr.dtype.element_ty))

    x = torch.ones(16)
    y = torch.empty(16, dtype=torch.float8_e4m3fnuz)
    store_cast[(1,)](x, y)
    assert torch.equal(y.float(), x)


def _probe_dot_scaled() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def dot_scaled(a_ptr, b_ptr, s_ptr, o_ptr, A_FORMAT: tl.constexpr):
        m = tl.arange(0, 16)
        k = tl.arange(0, 32)
        a = tl.load(a_ptr + m[:, None] * 32 + k[None, :])  # [16, 32] bf16
        b = tl.load(b_ptr + tl.arange(0, 16)[:, None] * 16 + m[None, :])  # [32/2, 16] packed e2m1
        s = tl.load(s_ptr + m[:, None] + tl.arange(0, 1)[None, :])  # [16, 1] e8m0 per 32 of K
        acc = tl.dot_scaled(a, None, A_FORMAT, b, s, "e2m1")
        tl.store(o_ptr + m[:, None] * 16 + m[None, :], acc)

    a = torch.ones(16, 32, dtype=torch.bfloat16)
    b = torch.full((16, 16), 0x22, dtype=torch.uint8)  # every code 2 = 1.0
    s = torch.full((16, 1), 127, dtype=torch.uint8)  # 2**0
    out = torch.empty(16, 16)
    dot_scaled[(1,)](a, b, s, out, A_FORMAT="bf16")
    assert torch.equal(out, torch.full_like(out, 32.0))


_PROBES = {"e4m3fnuz": _probe_e4m3fnuz, "dot_scaled": _probe_dot_scaled}


@functools.cache
def interpreter_gap(feature: str) -> str | None:
    """None when Triton's interpreter runs `feature` ("e4m3fnuz" tensors, `tl.dot_scaled`) here,
    else the reason to skip. Only meaningful with TRITON_INTERPRET=1 (tests/run.sh sets it); older
    Triton releases compile these on the GPU but do not interpret them. Without the interpreter
    or without Triton the kernels' CPU wrappers run the references, so there is no gap."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return None
    import triton

    try:
        _PROBES[feature]()
    except Exception as e:  # the interpreter's own error types differ between releases
        return f"Triton {triton.__version__}'s interpreter cannot run {feature} ({type(e).__name__}: {e})"
    return None
