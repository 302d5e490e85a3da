"""Cached Triton launches: a small layer's kernel launched without Triton's per-call binding.

`kernel[grid](...)` binds the arguments, derives Triton's specialization key from them and looks
the compiled kernel up on every call. For the quantized Linear's small layers (M <= 256: adaLN,
time and text embeddings) that Python work is longer than the kernel itself, so the GPU waits on
the host (docs/benchmarks.md, "host time per call"). `launch` keeps the compiled kernel per key
of its own and calls its launcher directly from the second call on.

The key is a superset of what Triton specializes a kernel on: each tensor's dtype and 16-byte
alignment, each int's width class and whether it is 1 or a multiple of 16, every constexpr and
launch option, and the device. Two calls with the same key therefore get the same compiled
kernel from Triton too; a finer key only costs a cache entry. The first call of each key goes
through `kernel[grid](...)` itself (which compiles), so nothing Triton checks is skipped there.

The direct call needs Triton's launcher signature of 3.4+ (`triton.knobs`); elsewhere, under the
interpreter, or while a launch hook (a profiler) is set, every call takes the ordinary path. A
launcher that refuses the arguments makes that kernel take the ordinary path from then on.

On by default; ONLINEQUANT_TRITON_LAUNCH_CACHE=0 turns it off. On an H100 (torch 2.11, Triton
3.6) the cached launches give the ordinary launches' bits (tests/unit/test_kernel_launch.py) and
take the FP8 Linear at M = 1/16/256 from 87-90 to 79-81 host microseconds a call (`python -m
quant.bench --sections gemm`, `ours_fp8_auto` against `ours_fp8_auto_cached_launch`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from . import interpreting

log = logging.getLogger(__name__)
_I32 = (-(2**31), 2**31)
# kernel -> {key -> compiled kernel}; bounded per kernel so an unusual caller cannot grow it forever
_COMPILED: dict[Any, dict[tuple, Any]] = {}
_MAX_KEYS_PER_KERNEL = 256
_UNCACHEABLE: dict = {}  # marks a kernel whose direct launch failed: Triton's own launch from then on
# False: every launch takes Triton's ordinary path (see the module docstring; the bench sets it)
CACHE_ENABLED = os.environ.get("ONLINEQUANT_TRITON_LAUNCH_CACHE", "1") != "0"


@functools.cache
def _runtime() -> Any | None:
    """triton.knobs.runtime where the direct launcher call is known to work (Triton 3.4+), else
    None. Looked up once: the hooks in it are read on every call."""
    try:
        import triton
        from triton import knobs
    except ImportError:
        return None
    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    return knobs.runtime if (major, minor) >= (3, 4) else None


def _arg_key(a: Any) -> Any:
    t = type(a)
    if t is int:  # the common case first, as one small int: 1? multiple of 16? i32? non-negative?
        return (a == 1) | (a % 16 == 0) << 1 | (_I32[0] <= a < _I32[1]) << 2 | (a >= 0) << 3
    if t is torch.Tensor or isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if t is bool:  # Triton types it i1: kept apart from the ints' small-int keys
        return ("b", a)
    if isinstance(a, int):  # an int subclass other than bool
        return _arg_key(int(a))
    if isinstance(a, float):
        return "f"
    return ("v", a)  # None and anything else: by value (constexpr-like)


def launch_key(args: Sequence[Any], constexprs: dict[str, Any], device: int) -> tuple:
    """The cache key of one launch on CUDA device `device` (exposed for tests): equal keys mean
    equal Triton specializations. `constexprs` come in the caller's fixed order. Built on every
    small-layer call, hence `map` and the int fast path (~2.3 instead of ~3.1 us on a CPU core)."""
    return (device, tuple(map(_arg_key, args)), tuple(constexprs.items()))


def launch(
    kernel: Any,
    grid: tuple[int, ...],
    args: Sequence[Any],
    constexprs: dict[str, Any],
) -> None:
    """`kernel[grid](*args, **constexprs)` (launch options such as num_warps go in `constexprs`
    too), with the compiled kernel looked up by `launch_key` instead of by Triton's binder."""
    runtime = _runtime()
    if runtime is None or not CACHE_ENABLED or interpreting() or _hook_set(runtime.launch_enter_hook):
        kernel[grid](*args, **constexprs)
        return
    # Triton compiles and launches for the current device, on its current stream: so does this.
    device = torch.cuda.current_device()
    key = launch_key(args, constexprs, device)
    cache = _COMPILED.setdefault(kernel, {})
    if cache is _UNCACHEABLE:
        kernel[grid](*args, **constexprs)
        return
    compiled = cache.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **constexprs)
        if hasattr(compiled, "result"):  # an asynchronous compile's future (Triton 3.5+ option)
            compiled = compiled.result()
        if len(cache) < _MAX_KEYS_PER_KERNEL and compiled is not None:
            cache[key] = (compiled, _params_tail(kernel, len(args), constexprs))
        return
    compiled, tail = compiled
    g = (*grid, 1, 1)
    stream = torch._C._cuda_getCurrentRawStream(device)
    try:
        # Triton 3.4+'s launcher: grid, stream, function, metadata, launch metadata (None without
        # a hook), enter/exit hooks, then every parameter's value in signature order.
        compiled.run(
            g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None,
            runtime.launch_exit_hook if _hook_set(runtime.launch_exit_hook) else None, *args, *tail,
        )
    except (TypeError, ValueError, AttributeError, RuntimeError) as e:
        # A Triton whose launcher takes other arguments refuses them before launching anything:
        # say so once, and launch this kernel the ordinary way from now on.
        log.warning("cached Triton launch of %s failed (%s); using Triton's own launch", kernel, e)
        cache.clear()
        _COMPILED[kernel] = _UNCACHEABLE
        kernel[grid](*args, **constexprs)


def _hook_set(hook: Any) -> bool:
    """Whether a launch hook is set: Triton 3.4/3.5 hold None when none is, 3.6 an empty HookChain."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _params_tail(kernel: Any, n_args: int, constexprs: dict[str, Any]) -> tuple:
    """The values of the parameters after the positional ones, in signature order."""
    tail = []
    for p in kernel.params[n_args:]:
        if p.name in constexprs:
            tail.append(constexprs[p.name])
        elif p.has_default:
            tail.append(p.default)
        else:
            raise TypeError(f"{kernel.fn.__name__}: no value for parameter {p.name!r}")
    return tuple(tail)


def clear_cache() -> None:
    """Forget every cached compiled kernel (tests; Triton's own cache is untouched)."""
    _COMPILED.clear()


__all__ = ["clear_cache", "launch", "launch_key"]
