"""The pack's weight formats as ComfyUI quantized-tensor layouts (comfy-kitchen `QuantizedTensor`).

A quantized Linear weight is an `OnlineQuantTensor` (a comfy-kitchen `QuantizedTensor`) whose
`_qdata` / `_params` hold exactly what `quant.formats.QuantizedWeight` holds (packed data, scale,
logical shape, format name). Being a registered layout gives it ComfyUI's own handling of
`empty_like`+`copy_`, `.to(device)`, `.to(dtype)`, `clone` and `state_dict()`; every op without a
handler falls back to `dequantize()` (comfy-kitchen's rule), so LoRA math and odd ops stay correct.

The subclass fixes what ComfyUI's weight patching (LoRA, hook LoRA, merges, backups) needs and
comfy-kitchen 0.2.x does not give: the packed data and the scale behave as ONE value.
- `.to(..., copy=True)` is a real copy of data and scale, also under `torch.inference_mode()`
  (where the call arrives as `aten.to.*`, which comfy-kitchen answers with an alias);
- `detach()` / `.data` alias the scale too (comfy-kitchen clones it), so `param.data.copy_(backup)`
  (`comfy.utils.copy_to_param`) restores the scale of the live weight, not of a throw-away clone;
- `copy_(src)` stores src's value in this tensor's format, in place: a packed src of the same
  format is copied byte for byte, anything else (a plain float weight such as ModelPatcher's cached
  hook weights, another format) is quantized;
- `nbytes` counts data + scale, so ComfyUI's `module_size()` (sum of `state_dict()` nbytes) is what
  the layer holds without a second state-dict key per layer (every key `state_dict()` reports must
  be an attribute ModelPatcher can patch). ComfyUI pins only tensors named `Parameter` or
  `QuantizedTensor` (one range `data_ptr()`..`nbytes`): ours are two allocations, so offloaded
  packed weights are not pinned.

Layouts are looked up by name, one per kind of packing; the format name (e.g. "fp8_e4m3fn" vs
"fp8_e4m3fnuz") is a field of the params, so no `if format == ...` chain exists here:
the format registry in `quant.formats` does the work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from comfy.quant_ops import QuantizedTensor, register_layout_class, register_layout_op
from comfy_kitchen.tensor.base import BaseLayoutParams, QuantizedLayout

from ..quant.errors import PackedWeightError
from ..quant.formats import QuantizedWeight, get_format
from ..quant.matmul.linear import quantized_linear

FP8_CHANNEL_LAYOUT = "OnlineQuantFP8ChannelLayout"
MXFP4_LAYOUT = "OnlineQuantMXFP4Layout"


@dataclass(frozen=True)
class OnlineQuantParams(BaseLayoutParams):
    """`scale` is the format's scale tensor (fp32 [N,1] / [] for FP8, uint8 E8M0 [N,K/32] for
    MXFP4); `format` names the entry of `quant.formats.FORMATS`; `compute` is the activation
    mode passed to `quantized_linear` ("auto", "w8a8", "w8a16", ...)."""

    format: str = ""
    compute: str = "auto"


class _OnlineQuantLayout(QuantizedLayout):
    """Shared behaviour; subclasses only differ by the registered name (one per packing)."""

    Params = OnlineQuantParams
    NAME = ""

    @classmethod
    def quantize(
        cls,
        tensor: torch.Tensor,
        format: str = "",
        orig_dtype: torch.dtype | None = None,
        compute: str = "auto",
        **kwargs,
    ) -> tuple[torch.Tensor, OnlineQuantParams]:
        # kwargs: ComfyUI's callers may pass scale="recalculate", stochastic_rounding=...,
        # inplace_ops=...; online quantization always recomputes its scales.
        qw = get_format(format).quantize(tensor)
        params = OnlineQuantParams(
            scale=qw.scale,
            orig_dtype=orig_dtype or tensor.dtype,
            orig_shape=tuple(qw.shape),
            format=qw.format,
            compute=compute,
        )
        return qw.qdata, params

    @classmethod
    def dequantize(cls, qdata: torch.Tensor, params: OnlineQuantParams) -> torch.Tensor:
        qw = QuantizedWeight(
            format=params.format, qdata=qdata, scale=params.scale, shape=tuple(params.orig_shape)
        )
        return get_format(params.format).dequantize(qw, params.orig_dtype)

    @classmethod
    def get_plain_tensors(cls, qtensor: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        return qtensor._qdata, qtensor._params.scale

    @classmethod
    def state_dict_tensors(cls, qdata: torch.Tensor, params: OnlineQuantParams) -> dict[str, torch.Tensor]:
        return {"": qdata, "_scale": params.scale}


class OnlineQuantFP8ChannelLayout(_OnlineQuantLayout):
    """FP8 (e4m3fn / e4m3fnuz) data [N, K], one fp32 scale per output channel [N, 1]."""

    NAME = FP8_CHANNEL_LAYOUT


class OnlineQuantMXFP4Layout(_OnlineQuantLayout):
    """OCP MXFP4: E2M1 codes packed two per byte [N, K/2], E8M0 block scales [N, K/32]."""

    NAME = MXFP4_LAYOUT


class OnlineQuantTensor(QuantizedTensor):
    """A `QuantizedTensor` of one of our layouts whose data and scale act as one value (see the
    module docstring). Every tensor comfy-kitchen derives from it (`_copy_with`: to, clone,
    empty_like, detach; torch.compile's unflatten) is again an `OnlineQuantTensor`."""

    @property
    def nbytes(self) -> int:
        return self._qdata.nbytes + self._params.scale.nbytes

    def data_ptr(self) -> int:
        # comfy-kitchen answers the packed data's address, and code that reads a tensor's memory as
        # its logical dtype and shape (safetensors' save_file, e.g. LoraSave's full_diff) would
        # write the packed bytes and then whatever memory follows them. ComfyUI reads no address of
        # ours (it pins only tensors of its own type names), so none is given.
        def described(shape, dtype) -> str:
            return "x".join(map(str, shape)) + " " + str(dtype).removeprefix("torch.")

        logical = described(self.shape, self._params.orig_dtype)
        packed = described(self._qdata.shape, self._qdata.dtype)
        raise PackedWeightError(
            f"a quantized weight has no plain memory to read or write ({self._params.format}: {logical} "
            f"packed into {packed} and a scale): dequantize() it first. ModelSave, CheckpointSave and "
            "LoraSave's 'standard' type save a quantized model dequantized; its 'full_diff' type cannot"
        )

    def _copy_with(self, qdata=None, params=None, clone_params=True) -> OnlineQuantTensor:
        if params is None:
            params = self._params.clone() if clone_params else self._params
        return OnlineQuantTensor(qdata if qdata is not None else self._qdata, self._layout_cls, params)

    def _stable_hash_for_caching(self) -> str:
        # what the traced graph depends on besides the inner tensors' shapes/dtypes (AOTAutograd's
        # cache key for tensor subclasses): the packing, the format and the compute mode
        p = self._params
        return f"{self._layout_cls}:{p.format}:{p.compute}:{p.orig_dtype}:{tuple(p.orig_shape)}"

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        t = QuantizedTensor.__tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride)
        return OnlineQuantTensor(t._qdata, t._layout_cls, t._params)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        handler = _OVERRIDES.get(func)
        if handler is not None:
            return handler(func, args, kwargs or {})
        return super().__torch_dispatch__(func, types, args, kwargs)


def _named_args(func, args, kwargs) -> dict[str, Any]:
    """An aten call's arguments by schema name (positional or keyword), defaults filled in."""
    out = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _to(func, args, kwargs):
    """Every `aten.to` overload: honours `copy=True` (a new data AND scale), moves both tensors."""
    a = _named_args(func, args, kwargs)
    qt = a["self"]
    device, dtype = a.get("device"), a.get("dtype")
    if func is torch.ops.aten.to.other:
        device, dtype = a["other"].device, a["other"].dtype
    device = torch.device(device) if device is not None else qt._qdata.device
    dtype = dtype if dtype is not None else qt._params.orig_dtype
    moves = device != qt._qdata.device
    if not moves and dtype == qt._params.orig_dtype and not a.get("copy", False):
        return qt
    if moves:
        qdata, params = qt._qdata.to(device=device), qt._params.to_device(device)
    elif a.get("copy", False):
        qdata, params = qt._qdata.clone(), qt._params.clone()
    else:  # a new logical dtype only: same packed bytes (comfy-kitchen's behaviour)
        qdata, params = qt._qdata, qt._params.clone()
    return qt._copy_with(
        qdata=qdata, params=dataclasses.replace(params, orig_dtype=dtype), clone_params=False
    )


def _detach(func, args, kwargs):
    qt = args[0]
    if qt.is_inference():
        return qt._copy_with(qdata=qt._qdata.detach(), clone_params=False)
    # a weight made outside inference mode, detached inside it (state_dict() while sampling):
    # autograd shares the input's version counter with the result, which an inference tensor
    # does not have, so the alias is made as a normal tensor
    with torch.inference_mode(False):
        return qt._copy_with(qdata=qt._qdata.detach(), clone_params=False)


def _copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
    if not is_online_quant(dst):  # a plain tensor takes the dequantized value
        return dst.copy_(src.dequantize() if isinstance(src, QuantizedTensor) else src, non_blocking)
    if tuple(src.shape) != tuple(dst.shape):
        raise RuntimeError(f"copy_: shape {tuple(src.shape)} into a quantized weight of {tuple(dst.shape)}")
    p = dst._params
    same = (
        is_online_quant(src)
        and src._params.format == p.format
        and src._qdata.shape == dst._qdata.shape
        and src._params.scale.shape == p.scale.shape
    )
    if same:
        qdata, scale = src._qdata, src._params.scale
    else:
        value = src.dequantize() if isinstance(src, QuantizedTensor) else src
        qw = get_format(p.format).quantize(value.to(device=dst._qdata.device))
        qdata, scale, non_blocking = qw.qdata, qw.scale, False
    dst._qdata.copy_(qdata, non_blocking=non_blocking)
    p.scale.copy_(scale, non_blocking=non_blocking)
    return dst


_OVERRIDES = {
    torch.ops.aten.to.dtype_layout: _to,
    torch.ops.aten.to.dtype: _to,
    torch.ops.aten.to.device: _to,
    torch.ops.aten.to.other: _to,
    torch.ops.aten.detach.default: _detach,
    torch.ops.aten.copy_.default: _copy_,
}


LAYOUTS: dict[str, type[_OnlineQuantLayout]] = {
    FP8_CHANNEL_LAYOUT: OnlineQuantFP8ChannelLayout,
    MXFP4_LAYOUT: OnlineQuantMXFP4Layout,
}


# The ComfyUI layout that holds each format kind's packed weight (quant.formats: WeightFormat.kind).
LAYOUT_FOR_KIND = {"fp8": FP8_CHANNEL_LAYOUT, "mxfp4": MXFP4_LAYOUT}


def layout_for_format(format_name: str) -> str:
    """The layout name a format's packed weight is stored under (by the packing, not the name)."""
    return LAYOUT_FOR_KIND[get_format(format_name).kind]


def to_quantized_tensor(
    qw: QuantizedWeight, orig_dtype: torch.dtype, compute: str = "auto"
) -> OnlineQuantTensor:
    """Wrap a `QuantizedWeight` as an `OnlineQuantTensor` (no copy)."""
    register_layouts()
    params = OnlineQuantParams(
        scale=qw.scale, orig_dtype=orig_dtype, orig_shape=tuple(qw.shape), format=qw.format, compute=compute
    )
    return OnlineQuantTensor(qw.qdata, layout_for_format(qw.format), params)


def quantize_to_tensor(
    w: torch.Tensor, format_name: str, orig_dtype: torch.dtype, compute: str = "auto"
) -> QuantizedTensor:
    """Quantize a plain weight [N, K] into a `QuantizedTensor` of the format's layout."""
    return to_quantized_tensor(get_format(format_name).quantize(w), orig_dtype, compute)


def is_online_quant(t: object) -> bool:
    return isinstance(t, QuantizedTensor) and t._layout_cls in LAYOUTS


def as_quantized_weight(t: QuantizedTensor) -> QuantizedWeight:
    """The `QuantizedWeight` view of one of our `QuantizedTensor`s (shares storage)."""
    p = t._params
    return QuantizedWeight(format=p.format, qdata=t._qdata, scale=p.scale, shape=tuple(p.orig_shape))


def packed_nbytes(t: QuantizedTensor) -> int:
    """Bytes the packed weight holds: data + scales."""
    return t._qdata.nbytes + t._params.scale.nbytes


def with_dtype(t: QuantizedTensor, dtype: torch.dtype) -> QuantizedTensor:
    """Same packed data, another logical (dequantized) dtype."""
    return OnlineQuantTensor(t._qdata, t._layout_cls, dataclasses.replace(t._params, orig_dtype=dtype))


def _linear_handler(qt, args, kwargs):
    """`aten.linear` with one of our weights: the quantized matmul (plain input only)."""
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if isinstance(x, QuantizedTensor) or not is_online_quant(w):
        from comfy_kitchen.tensor.base import dequantize_args

        return torch.nn.functional.linear(*dequantize_args((x, w, bias)))
    return quantized_linear(x, as_quantized_weight(w), bias, compute=w._params.compute)


# `onlinequant::linear_quantized_weight(x, weight, bias)`: what a compiled forward calls for one of
# our weights. Dynamo records it as one op without reading the weight's params object (which it
# cannot trace before torch 2.13). Below Dynamo, AOTAutograd unwraps the tensor subclass and the
# call reaches `_linear_handler` through the layout table, which emits the quantized matmul as
# plain ops (activation quantization + `_scaled_mm`) for Inductor to fuse. `F.linear` would not
# do: it is a composite op that decomposes to `t` + `addmm` before the subclass sees it, and
# those fall back to dequantize + a bf16 matmul. With plain tensors the op is `F.linear`.
LINEAR_OP_NAME = "linear_quantized_weight"
_linear_lib: torch.library.Library | None = None  # kept alive: dropping it unregisters the op


def _define_linear_op() -> Any:
    global _linear_lib
    ns = torch.ops.onlinequant
    if not hasattr(ns, LINEAR_OP_NAME):  # the pack imported twice in one process defines it once
        _linear_lib = torch.library.Library("onlinequant", "FRAGMENT")
        _linear_lib.define(f"{LINEAR_OP_NAME}(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
        _linear_lib.impl(LINEAR_OP_NAME, torch.nn.functional.linear, "CompositeExplicitAutograd")
        torch.library.register_fake(
            f"onlinequant::{LINEAR_OP_NAME}",
            lambda x, weight, bias: x.new_empty((*x.shape[:-1], weight.shape[0])),
            lib=_linear_lib,
        )
    return getattr(ns, LINEAR_OP_NAME).default


_registered = False


def register_layouts() -> None:
    """Register both layouts and their `aten.linear` handler with ComfyUI (idempotent).

    Called by `make_ops` and before any of our `QuantizedTensor`s is made, not at import time:
    it only adds entries under our own names to ComfyUI's layout tables."""
    global _registered
    if _registered:
        return
    linear_op = _define_linear_op()
    for name, cls in LAYOUTS.items():
        register_layout_class(name, cls)
        register_layout_op(torch.ops.aten.linear.default, cls)(_linear_handler)
        register_layout_op(linear_op, cls)(_linear_handler)
    _registered = True
