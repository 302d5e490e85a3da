"""torch.library ops `onlinequant::fp8_linear` and `onlinequant::mxfp4_linear` (+ fake impls).

One opaque op per format kind, with plain tensor/str arguments, so torch.compile(fullgraph=True)
traces a model calling quant.matmul.linear.quantized_linear without graph breaks; the implementation
asks quant/backends.py which backend runs it (eager, at call time).

Schema (both ops):
    (Tensor x, Tensor qdata, Tensor scale, Tensor? bias, str format, str compute, str backend) -> Tensor
x [..., K]; qdata/scale as in quant.formats.QuantizedWeight; returns [..., N] in x.dtype, where
N = qdata.shape[0]. `backend` "" means "let backends.py choose".

This package can be imported twice in one process (as `quant` and as `<pack>.quant`,
e.g. in tests): each op is defined only if `torch.ops.onlinequant` does not have it yet; otherwise the
existing op is reused (it dispatches through the backend registry of the first import).

Host cost: the ops are defined with `torch.library.Library` (define + one
CompositeExplicitAutograd kernel + register_fake / register_autograd) rather than
`torch.library.custom_op`, whose per-call wrapper (dynamo-disable frame, output aliasing check)
doubled the op's host time under inference_mode; the kernel body is one cached backend lookup.
In eager mode without autograd, quant.matmul.linear.quantized_linear skips the op boundary altogether
(see `eager_ok`); torch.compile, tracing, dispatch modes and autograd always go through the op.
"""

from __future__ import annotations

import torch

from ..formats import QuantizedWeight, get_format
from .registry import resolve_run

NAMESPACE = "onlinequant"
_KIND_TO_OP = {"fp8": "fp8_linear", "mxfp4": "mxfp4_linear"}
_SCHEMA = (
    "(Tensor x, Tensor qdata, Tensor scale, Tensor? bias, str format, str compute, str backend) -> Tensor"
)

_LIB: torch.library.Library | None = None  # kept alive for the process: dropping it unregisters the ops


def _op_exists(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _impl(x, qdata, scale, bias, format, compute, backend):
    run, mode = resolve_run(format, x.device, compute, backend)
    return run(x, QuantizedWeight(format, qdata, scale, (qdata.shape[0], x.shape[-1])), bias, mode)


def _seen_by_dispatch(x: torch.Tensor) -> bool:
    """A tensor subclass input, or a dispatch mode active: the C++ mode stack counts user modes and
    infra modes (FakeTensorMode, ProxyTorchDispatchMode), so tracers below Dynamo see the call."""
    return type(x) is not torch.Tensor or bool(torch._C._len_torch_dispatch_stack())


def _no_gradient(x: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() or not (
        x.requires_grad or scale.requires_grad or (bias is not None and bias.requires_grad)
    )


def eager_ok(x: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor) -> bool:
    """True when calling the op's implementation directly gives exactly what the op gives: eager
    (not compiling, exporting or JIT-tracing), a plain tensor input, no dispatch mode (fake
    tensors, make_fx, FlopCounter must see the op) and no gradient to record. Cheap: it runs on
    every Linear call."""
    if torch.compiler.is_compiling() or _seen_by_dispatch(x):
        return False
    if torch._C._get_tracing_state() is not None:
        return False
    return _no_gradient(x, bias, scale)


def graph_traced(x: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor) -> bool:
    """True while a dispatch-level tracer (AOTAutograd, make_fx, a fake-tensor mode) records the
    call and no gradient is needed, but Dynamo is not the caller: plain ops are then recorded as
    they run, whereas Dynamo would have to trace the backend lookup in Python. Callers check
    `eager_ok` first."""
    if torch.compiler.is_dynamo_compiling() or not _seen_by_dispatch(x):
        return False
    return _no_gradient(x, bias, scale)


def _fake(x, qdata, scale, bias, format, compute, backend):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, qdata, scale, bias, format, compute, backend = inputs
    ctx.save_for_backward(qdata, scale)
    ctx.format, ctx.k, ctx.x_dtype = format, x.shape[-1], x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad):
    """Gradients for x (and bias) only, so LoRA/adapters before a frozen quantized Linear can
    train: d/dx = grad @ W with W the dequantized weight (straight-through for any activation
    quantization). The quantized weight itself gets no gradient."""
    qdata, scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        qw = QuantizedWeight(ctx.format, qdata, scale, (qdata.shape[0], ctx.k))
        grad_x = (grad @ get_format(ctx.format).dequantize(qw, grad.dtype)).to(ctx.x_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None, None, None


def _define(name: str) -> None:
    global _LIB
    if _op_exists(name):
        return
    if _LIB is None:
        _LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
    _LIB.define(name + _SCHEMA)
    _LIB.impl(name, _impl, "CompositeExplicitAutograd")
    qualname = f"{NAMESPACE}::{name}"
    torch.library.register_fake(qualname, _fake, lib=_LIB)
    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context, lib=_LIB)


for _name in _KIND_TO_OP.values():
    _define(_name)


def linear_op(kind: str):
    """The torch.ops callable for a WeightFormat.kind ("fp8" -> torch.ops.onlinequant.fp8_linear)."""
    try:
        return getattr(getattr(torch.ops, NAMESPACE), _KIND_TO_OP[kind])
    except KeyError:
        raise ValueError(f"no onlinequant op for format kind {kind!r}") from None


__all__ = ["NAMESPACE", "eager_ok", "graph_traced", "linear_op"]
