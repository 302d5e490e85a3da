"""THE one place that picks how a quantized Linear runs, by (format, device, capability, compute
request, what imports).

A backend is a `Backend` record in a registry: which format kinds and compute modes it runs, a
priority, a `check(device_info, fmt) -> (usable, reason)` and a `run(x, qw, bias, compute)`.
`choose_backend` takes the highest-priority usable backend that can run the requested compute;
the plain-PyTorch reference (priority 0) runs everything everywhere, so "auto" always resolves.

Built in here: "reference", dequantize + matmul (w8a16 / w4a16) or exact emulation (w8a8, w4a8,
w4a4) on any device. One module per backend family under matmul/backends/ registers the rest:
scaled_mm.py (`torch._scaled_mm`), triton.py (the kernels in quant/kernels), aiter.py (AMD
MI350). Each calls `register_backend(Backend(...))` when imported; `choose_backend` imports them
lazily once (PLUGIN_MODULES), so a missing optional package never breaks the reference. E.g.

    register_backend(Backend("aiter_a4w4", kinds=("mxfp4",), computes=("w4a4",), run=run,
                             check=lambda info, fmt: (info.arch == "gfx950", "AITER gemm_a4w4"),
                             priority=80, package="amd-aiter (ROCm build)"))

`run(x, qw, bias, compute)` gets x [..., K] and a QuantizedWeight and returns [..., N] in x.dtype;
`check(info, fmt)` must be cheap and must not import heavy packages (it runs once per device).

To force a backend: `choose_backend(..., backend="name")` raises BackendUnavailableError (naming
the package to install) when it cannot run. A forced compute mode is always honoured: a device
without the hardware for it runs the reference's exact emulation, and the reason says so.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import BackendUnavailableError
from ..formats import QuantizedWeight, WeightFormat, get_format
from .reference import reference_linear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    """What backend selection needs to know about a device."""

    type: str  # torch device type: "cpu", "cuda" (also ROCm), "mps", "xpu", ...
    index: int | None = None
    vendor: str = ""  # "nvidia", "amd" or "" (not a GPU we know)
    capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (9, 0)
    arch: str = ""  # "sm_90", "gfx942", ... ("" on CPU)

    def describe(self) -> str:
        return f"{self.type}" + (f" {self.arch}" if self.arch else "")


@dataclass(frozen=True)
class BackendChoice:
    name: str  # a registered backend name
    compute: str  # the compute mode it will run ("w8a8", "w4a16", ...)
    reason: str  # why this one, in words (shown in the load report)
    skipped: tuple[tuple[str, str], ...] = ()  # (backend, why not) for those ranked above it

    def describe(self) -> str:
        """The reason, followed by why each higher-ranked backend was not chosen."""
        if not self.skipped:
            return self.reason
        return f"{self.reason} (not chosen: " + "; ".join(f"{b}: {why}" for b, why in self.skipped) + ")"


# run(x, qw, bias, compute) -> x @ W.T (+ bias) in x.dtype
LinearRun = Callable[[torch.Tensor, QuantizedWeight, "torch.Tensor | None", str], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    kinds: tuple[str, ...]  # WeightFormat.kind values it serves ("fp8", "mxfp4")
    computes: tuple[str, ...]  # compute modes it implements, preferred first
    run: LinearRun
    check: Callable[[DeviceInfo, WeightFormat], tuple[bool, str]]  # (usable here, why / why not)
    priority: int = 0  # higher wins among usable backends
    package: str = ""  # what to install when it is missing (named in BackendUnavailableError)
    # `run`'s arithmetic in plain PyTorch ops only (no Triton launch, no custom op, no host sync),
    # or None: while a graph is traced (torch.compile's AOTAutograd, make_fx), this is what the
    # graph gets instead of the opaque op, so Inductor fuses the activation quantization into the
    # op that produces x (norm, modulation, GELU).
    traced_run: LinearRun | None = None


_BACKENDS: dict[str, Backend] = {}
# Choices per (format, device, compute, forced backend); the device is the torch.device object
# itself (hashable, what x.device gives), so a cache hit builds no string and no dataclass.
_CHOICE_CACHE: dict[tuple, BackendChoice] = {}
# The same key -> (the chosen backend's run function, compute mode): what each call needs, so a
# Linear's call costs one dict lookup (small GEMMs are host-bound: docs/benchmarks.md).
_RUN_CACHE: dict[tuple, tuple[Callable, str]] = {}
_TRACED_CACHE: dict[tuple, tuple[Callable, str] | None] = {}
_DEVICE_CACHE: dict[str, DeviceInfo] = {}
# Modules that register backends when imported; imported lazily, once (missing ones are fine).
PLUGIN_MODULES = (".backends.scaled_mm", ".backends.triton", ".backends.aiter")
_plugins_loaded = False


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Add a backend. A second registration of the same name needs replace=True (or is ignored
    when it is the very same record, so a re-imported plug-in is harmless)."""
    old = _BACKENDS.get(backend.name)
    if old is not None and old != backend and not replace:
        raise ValueError(f"a backend named {backend.name!r} is already registered (pass replace=True)")
    _BACKENDS[backend.name] = backend
    _forget_choices()


def unregister_backend(name: str) -> None:
    _BACKENDS.pop(name, None)
    _forget_choices()


def registered_backends() -> list[Backend]:
    """All backends, highest priority first."""
    _load_plugins()
    return sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def get_backend(name: str) -> Backend:
    _load_plugins()
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; registered: {', '.join(sorted(_BACKENDS))}") from None


def clear_cache() -> None:
    """Forget cached device queries and choices (tests monkeypatching capabilities call this)."""
    _forget_choices()
    _DEVICE_CACHE.clear()


def _forget_choices() -> None:
    _CHOICE_CACHE.clear()
    _RUN_CACHE.clear()
    _TRACED_CACHE.clear()


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for mod in PLUGIN_MODULES:
        try:
            importlib.import_module(mod, __package__)
        except ImportError as e:  # not built yet, or its optional dependency is missing
            log.debug("backend plug-in %s not loaded: %s", mod, e)
        except Exception:  # a broken plug-in must not take the reference path down with it
            log.warning("backend plug-in %s failed to import; using the others", mod, exc_info=True)


# --- device queries (monkeypatched in tests) -------------------------------------------------


def _is_rocm() -> bool:
    return torch.version.hip is not None


def _cuda_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def _rocm_arch(index: int) -> str:
    # gcnArchName looks like "gfx942:sramecc+:xnack-"; the part before ':' is the ISA.
    return torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]


def device_info(device: torch.device | str) -> DeviceInfo:
    device = torch.device(device)
    key = str(device)
    info = _DEVICE_CACHE.get(key)
    if info is not None:
        return info
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = _cuda_capability(index)
        if _is_rocm():
            info = DeviceInfo("cuda", index, "amd", cap, _rocm_arch(index))
        else:
            info = DeviceInfo("cuda", index, "nvidia", cap, f"sm_{cap[0]}{cap[1]}")
    else:
        info = DeviceInfo(device.type, device.index)
    _DEVICE_CACHE[key] = info
    return info


# --- selection -------------------------------------------------------------------------------


def _computes_for(b: Backend, fmt: WeightFormat) -> tuple[str, ...]:
    return tuple(c for c in b.computes if c in fmt.computes)


def choose_backend(
    format: str, device: torch.device | str, compute: str = "auto", backend: str | None = None
) -> BackendChoice:
    """Pick the backend (and compute mode) for a weight format on a device. Cached per device."""
    dev = device if isinstance(device, torch.device) else torch.device(device)
    key = (format, dev, compute, backend or "")
    hit = _CHOICE_CACHE.get(key)
    if hit is not None:
        return hit
    return _remember(key)[0]


def _remember(key: tuple) -> tuple[BackendChoice, tuple[Callable, str]]:
    format, device, compute, backend = key
    choice = _choose(get_format(format), device_info(device), compute, backend or None)
    run = (_BACKENDS[choice.name].run, choice.compute)
    _CHOICE_CACHE[key] = choice
    _RUN_CACHE[key] = run
    return choice, run


def resolve_run(
    format: str, device: torch.device, compute: str = "auto", backend: str | None = None
) -> tuple[Callable, str]:
    """(run, compute mode) of the backend `choose_backend` picks: the per-call fast path of
    quantized_linear and of the ops. `device` must be a torch.device (e.g. x.device); the first
    call per (format, device, compute, backend) chooses (and raises what choose_backend raises),
    later calls are one dict lookup."""
    key = (format, device, compute, backend or "")
    hit = _RUN_CACHE.get(key)
    if hit is not None:
        return hit
    return _remember(key)[1]


def resolve_traced(
    format: str, device: torch.device, compute: str = "auto", backend: str | None = None
) -> tuple[Callable, str] | None:
    """(traced_run, compute mode) to put in a traced graph for what `resolve_run` picks, or None
    (then the graph keeps the opaque op). The chosen backend's own traced_run when it has one;
    for a weights-only mode (`*a16`) `_weights_only_traced` (dequantize, then one matmul: what the
    fast kernels do too); never the reference's emulation of a quantized-activation mode, which is far
    slower than the kernel it would replace."""
    key = (format, device, compute, backend or "")
    if key in _TRACED_CACHE:
        return _TRACED_CACHE[key]
    choice = choose_backend(format, device, compute, backend)
    b = _BACKENDS[choice.name]
    found = None
    if b.traced_run is not None:
        found = (b.traced_run, choice.compute)
    elif not backend and choice.compute.endswith("a16"):
        found = (_weights_only_traced, choice.compute)
    _TRACED_CACHE[key] = found
    return found


def _choose(fmt: WeightFormat, info: DeviceInfo, compute: str, forced: str | None) -> BackendChoice:
    fmt.check_compute(compute)
    _load_plugins()
    if forced:
        b = get_backend(forced)
        modes = _computes_for(b, fmt)
        if fmt.kind not in b.kinds or not modes:  # a check is only asked about its own kinds
            ok, why = False, f"it does not run {fmt.name} weights"
        else:
            ok, why = b.check(info, fmt)
        if ok and compute != "auto" and compute not in modes:
            ok, why = False, f"it runs {modes}, not {compute}"
        if not ok:
            hint = f"; install {b.package}" if b.package else ""
            raise BackendUnavailableError(
                f"backend {b.name!r} cannot run {fmt.name} on {info.describe()}: {why}{hint}"
            )
        return BackendChoice(b.name, compute if compute != "auto" else modes[0], why)

    skipped: list[tuple[str, str]] = []
    for b in registered_backends():
        modes = _computes_for(b, fmt)
        if fmt.kind not in b.kinds or not modes:
            continue
        ok, why = b.check(info, fmt)
        if not ok:
            skipped.append((b.name, why))
            continue
        if compute != "auto" and compute not in modes:
            skipped.append((b.name, f"runs {', '.join(modes)}, not {compute}"))
            continue
        mode = modes[0] if compute == "auto" else compute
        reason = why if b.name != "reference" else _reference_reason(info, fmt, mode)
        return BackendChoice(b.name, mode, reason, tuple(skipped))
    raise BackendUnavailableError(  # only reachable if someone unregistered the reference
        f"no registered backend runs {fmt.name} {compute} on {info.describe()}"
    )


def _reference_reason(info: DeviceInfo, fmt: WeightFormat, mode: str) -> str:
    if mode.endswith("a16"):
        return f"{fmt.name} on {info.describe()}: dequantize to the activation dtype, then matmul (reference)"
    return (
        f"{fmt.name} {mode} on {info.describe()}: exact emulation in fp32 (reference; no native kernel here)"
    )


def run_linear(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: torch.Tensor | None = None,
    compute: str = "auto",
    backend: str | None = None,
) -> torch.Tensor:
    """Run a quantized linear with the chosen backend: quantized_linear's eager path, without the
    torch.library op (whose implementation, quant/ops.py `_impl`, resolves the same way)."""
    run, mode = resolve_run(qw.format, x.device, compute, backend)  # validates on first use
    if x.shape[-1] != qw.shape[1]:
        name = get_format(qw.format).name
        raise ValueError(f"input has {x.shape[-1]} features, the {name} weight expects {qw.shape[1]}")
    return run(x, qw, bias, mode)


def preferred_fp8_format(device: torch.device | str) -> str:
    """The FP8 format this device's tensor cores take: e4m3fnuz on MI300 (gfx942), else e4m3fn."""
    return "fp8_e4m3fnuz" if device_info(device).arch == "gfx942" else "fp8_e4m3fn"


# --- built-in backends -----------------------------------------------------------------------


def _reference_run(x, qw, bias, compute):
    return reference_linear(x, qw, bias, compute)


def _weights_only_traced(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None, compute: str):
    """A weights-only mode (`*a16`) in a traced graph: the whole weight dequantized in one
    expression (Inductor makes it one pass, the eager kernels' workspace) and one F.linear with
    the bias in the GEMM's epilogue. Not the reference's row chunks: in a functional graph each
    chunk written into the output is a slice_scatter over the whole [M, N] output, which made a
    compiled Wan 2.2 5B step (attention weights-only) 7% slower than eager on an H100."""
    w = get_format(qw.format).dequantize_unchunked(qw, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _reference_traced(x, qw, bias, compute):  # compute: resolve_traced's concrete mode
    if compute.endswith("a16"):
        return _weights_only_traced(x, qw, bias, compute)
    return reference_linear(x, qw, bias, compute)


def _reference_check(info: DeviceInfo, fmt: WeightFormat) -> tuple[bool, str]:
    return True, "plain PyTorch reference"


BUILTIN_BACKENDS = (
    Backend(
        "reference",
        ("fp8", "mxfp4"),
        ("w8a16", "w4a16", "w8a8", "w4a8", "w4a4"),
        _reference_run,
        _reference_check,
        priority=0,
        traced_run=_reference_traced,
    ),
)
for _b in BUILTIN_BACKENDS:
    register_backend(_b)
del _b

__all__ = [
    "BUILTIN_BACKENDS",
    "Backend",
    "BackendChoice",
    "DeviceInfo",
    "choose_backend",
    "clear_cache",
    "device_info",
    "get_backend",
    "preferred_fp8_format",
    "register_backend",
    "registered_backends",
    "resolve_traced",
    "resolve_run",
    "run_linear",
    "unregister_backend",
]
