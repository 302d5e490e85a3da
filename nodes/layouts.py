"""The pack's weight formats as ComfyUI quantized-tensor layouts (comfy-kitchen `QuantizedTensor`).

A quantized Linear weight is a `QuantizedTensor` whose `_qdata` / `_params` hold exactly what
`quant.formats.QuantizedWeight` holds (packed data, scale, logical shape, format name). Being a
registered layout gives it ComfyUI's own handling of `empty_like`+`copy_`, `.to(device)`,
`.to(dtype)`, `clone`, pinning and `state_dict()`; every op without a handler here falls back to
`dequantize()` (comfy-kitchen's rule), so LoRA math and odd ops stay correct.

Layouts are looked up by name, one per kind of packing; the format name (e.g. "fp8_e4m3fn" vs
"fp8_e4m3fnuz") is a field of the params, so no `if format == ...` chain exists here:
the format registry in `quant.formats` does the work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from comfy.quant_ops import QuantizedTensor, register_layout_class, register_layout_op
from comfy_kitchen.tensor.base import BaseLayoutParams, QuantizedLayout

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
) -> QuantizedTensor:
    """Wrap a `QuantizedWeight` as a ComfyUI `QuantizedTensor` (no copy)."""
    register_layouts()
    params = OnlineQuantParams(
        scale=qw.scale, orig_dtype=orig_dtype, orig_shape=tuple(qw.shape), format=qw.format, compute=compute
    )
    return QuantizedTensor(qw.qdata, layout_for_format(qw.format), params)


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
    return QuantizedTensor(t._qdata, t._layout_cls, dataclasses.replace(t._params, orig_dtype=dtype))


def _linear_handler(qt, args, kwargs):
    """`aten.linear` with one of our weights: the quantized matmul (plain input only)."""
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if isinstance(x, QuantizedTensor) or not is_online_quant(w):
        from comfy_kitchen.tensor.base import dequantize_args

        return torch.nn.functional.linear(*dequantize_args((x, w, bias)))
    return quantized_linear(x, as_quantized_weight(w), bias, compute=w._params.compute)


_registered = False


def register_layouts() -> None:
    """Register both layouts and their `aten.linear` handler with ComfyUI (idempotent).

    Called by `make_ops` and before any of our `QuantizedTensor`s is made, not at import time:
    it only adds entries under our own names to ComfyUI's layout tables."""
    global _registered
    if _registered:
        return
    for name, cls in LAYOUTS.items():
        register_layout_class(name, cls)
        register_layout_op(torch.ops.aten.linear.default, cls)(_linear_handler)
    _registered = True
