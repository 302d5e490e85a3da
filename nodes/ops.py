"""ComfyUI ops class whose Linear quantizes its weight while the model loads.

`make_ops(plan, ...)` returns a NEW class for every load (handed to ComfyUI as
`model_options["custom_operations"]`): the plan, format and per-load records live on that fresh
class, never on a class that other loaded models share.

How a Linear is loaded (`_load_from_state_dict`, called once per layer by ComfyUI's
`load_state_dict`): the plan's decision for the layer name (relative to `diffusion_model`) says
quantize or keep. A quantized weight is moved to the quantization device (the GPU when there is
one), quantized there, and only the packed result is kept, on the device the module lives on;
the high-precision copy is dropped at once, so at most one layer's worth of extra memory exists
at a time.

Rules:
- the module is a `CastWeightBiasOp`; the parameter is called `weight` and holds a comfy-kitchen
  `QuantizedTensor` (see nodes/layouts.py), so LoRA keys, `.to()`, pinning and clones work;
- `convert_weight` dequantizes, `set_weight` requantizes (also with `inplace_update=True`);
- `forward` with `comfy_cast_weights` (lowvram) or weight/bias functions (LoRA while offloaded)
  goes through `cast_bias_weight(..., offloadable=True)` / `uncast_bias_weight`;
  otherwise it runs `quant.matmul.linear.quantized_linear` on the packed weight.
- A NaN/Inf weight is an error naming the layer (`NonFiniteWeightError`): a corrupt checkpoint
  must not silently turn into a model that renders black frames.
- Out of memory while quantizing a layer frees what was taken and raises
  `QuantizationOOMError` naming the layer and the bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import comfy.model_management
import comfy.ops
import torch
from comfy.ops import CastWeightBiasOp, cast_bias_weight, run_every_op, uncast_bias_weight
from comfy.quant_ops import QuantizedTensor

from ..quant.errors import CheckpointError, NonFiniteWeightError, QuantizationOOMError
from ..quant.formats import get_format
from ..quant.matmul.linear import quantized_linear
from ..quant.quality import quantized_weight_sqnr_db, quantized_weight_sqnr_sums
from .layouts import (
    OnlineQuantTensor,
    as_quantized_weight,
    is_online_quant,
    packed_nbytes,
    quantize_to_tensor,
    register_layouts,
    to_quantized_tensor,
)
from .load_state import LoadState, defers_checks, non_finite_weight_error, to_quantize_device
from .report import LayerRecord

log = logging.getLogger(__name__)


def _owned(weight: OnlineQuantTensor, dtype: torch.dtype, device: torch.device) -> OnlineQuantTensor:
    """A packed weight on `device` whose data and scale are in memory it owns (a packed file's
    are lazily read tensors, read here once: bit for bit what the file holds), with `dtype` as
    its logical dtype (the layer's, which ComfyUI chose for this device). Bound for a GPU, file
    bytes go through pinned memory with an asynchronous copy, as weights to quantize do."""

    def owned(t: torch.Tensor) -> torch.Tensor:
        if hasattr(t, "_reader") and device.type == "cuda":
            return to_quantize_device(t, device)
        t = t.materialize() if hasattr(t, "materialize") else t
        return t.to(device=device)

    params = dataclasses.replace(weight._params, scale=owned(weight._params.scale), orig_dtype=dtype)
    return OnlineQuantTensor(owned(weight._qdata), weight._layout_cls, params)


def _skip_host_scan(weight: OnlineQuantTensor) -> None:
    """A packed weight's bytes still unread in the file: the reader need not scan them for
    NaN/Inf, the format checks them where they land (on a GPU the scan costs the host nothing)."""
    for t in (weight._qdata, weight._params.scale):
        if hasattr(t, "_reader"):
            t._reader.checked_by_caller(t._name)


class OnlineQuantLinear(torch.nn.Module, CastWeightBiasOp):
    """A Linear whose weight may be a packed `QuantizedTensor`; see the module docstring."""

    _oq_state: LoadState  # set on the per-load subclass made by make_ops

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._oq_dtype = dtype or torch.get_default_dtype()
        self._oq_device = device
        self._oq_format: str | None = None  # set when the weight is quantized
        self._oq_compute = "auto"  # its compute mode (the plan may ask for weights only)
        # The real weight arrives in _load_from_state_dict; a meta placeholder keeps the shape
        # visible without allocating a high-precision copy of the whole model.
        self.weight = torch.nn.Parameter(
            torch.empty((out_features, in_features), device="meta", dtype=self._oq_dtype), requires_grad=False
        )
        if bias:
            self.bias = torch.nn.Parameter(
                torch.empty(out_features, device=device, dtype=dtype), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        return None

    # ---- loading ---------------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        name = prefix[:-1] if prefix.endswith(".") else prefix
        state = self._oq_state
        if state.progress is not None:
            state.progress.check()  # Cancel stops the load here, before the next layer is read
        weight_key = f"{prefix}weight"
        weight = state_dict.pop(weight_key, None)
        # a packed weight carries its scale (nodes/layouts.py); a separate scale entry, as
        # earlier state_dict()s of this Linear reported, is not a parameter of its own
        state_dict.pop(f"{prefix}weight_scale", None)
        if weight is None:
            raise CheckpointError(f"layer {name!r}: the checkpoint has no {weight_key!r}")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise CheckpointError(
                f"layer {name!r}: weight shape {tuple(weight.shape)} does not fit the model's "
                f"{(self.out_features, self.in_features)}"
            )
        if not isinstance(weight, QuantizedTensor) and not weight.is_floating_point():
            raise CheckpointError(  # an integer weight reached the quantizer as a TypeError
                f"layer {name!r}: weight dtype {weight.dtype} is not a floating-point type, so it does "
                "not fit this model (an integer-quantized or damaged checkpoint?)"
            )
        state.seen.add(name)
        target = self._target_device(weight)
        decision = state.plan.decision(name) if state.plan is not None else None
        before = weight.numel() * weight.element_size()

        if is_online_quant(weight):  # packed in the file (nodes/packed.py), or a state_dict() reloaded
            dest = torch.device(state.packed_device or target)
            check = name in state.packed_from_file  # not a state_dict() of a model in memory
            if check:
                _skip_host_scan(weight)
            owned = _owned(weight, self._oq_dtype, dest)
            self.weight = torch.nn.Parameter(owned, requires_grad=False)
            self._oq_format, self._oq_compute = weight._params.format, weight._params.compute
            reason = decision.reason if decision is not None else "already quantized"
            source = decision.source if decision is not None else "file"
            record = LayerRecord(
                name,
                self.out_features,
                self.in_features,
                True,
                reason,
                source,
                before,
                packed_nbytes(self.weight),
                None,
                self._oq_compute,
            )
            state.records.append(record)
            if check:
                finite = get_format(self._oq_format).packed_finite(as_quantized_weight(self.weight))
                state.queue(record, finite, None, dest, packed=True)
        elif isinstance(weight, QuantizedTensor):  # another layout: kept as ComfyUI made it
            self.weight = torch.nn.Parameter(weight.to(device=target), requires_grad=False)
            self._oq_format, self._oq_compute = None, "auto"
        elif decision is not None and decision.quantize:
            self._oq_compute = state.compute_for(decision)
            self.weight = torch.nn.Parameter(self._quantize(name, weight, target, state), requires_grad=False)
            self._oq_format = state.format
        else:
            self.weight = torch.nn.Parameter(
                weight.to(device=target, dtype=self._oq_dtype), requires_grad=False
            )
            reason = decision.reason if decision is not None else "not in the plan (kept)"
            source = decision.source if decision is not None else "unplanned"
            state.records.append(
                LayerRecord(name, self.out_features, self.in_features, False, reason, source, before, before)
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if weight_key in missing_keys:
            missing_keys.remove(weight_key)
        if state.progress is not None:
            state.progress.advance(before)

    def _target_device(self, weight: torch.Tensor) -> torch.device:
        if self.bias is not None and self.bias.device.type != "meta":
            return self.bias.device
        if self._oq_device is not None:
            return torch.device(self._oq_device)
        return weight.device

    def _quantize(
        self, name: str, weight: torch.Tensor, target: torch.device, state: LoadState
    ) -> QuantizedTensor:
        qdev = state.quantize_device or weight.device
        n, k = self.out_features, self.in_features
        fmt = get_format(state.format)
        defer = defers_checks(qdev)  # see LoadState.pending
        t0 = time.perf_counter()
        w = None
        sqnr = sums = finite = None
        try:
            w = to_quantize_device(weight, qdev)
            try:
                qw = fmt.quantize(w, check_finite=not defer)
            except NonFiniteWeightError as e:
                raise non_finite_weight_error(name, n, k, str(e)) from None
            if state.record_sqnr:
                # 256 evenly spaced rows: exact per row (row-local formats), ~1% of the quantization
                if defer:
                    sums = quantized_weight_sqnr_sums(w, qw)
                else:
                    sqnr = quantized_weight_sqnr_db(w, qw)
            finite = fmt.finite(qw) if defer else None
            qt = to_quantized_tensor(qw, self._oq_dtype, self._oq_compute)
            qt = qt.to(device=state.packed_device or target)
        except torch.OutOfMemoryError:
            w = None
            qt = None
            if qdev.type == "cuda":
                torch.cuda.empty_cache()
            need = n * k * weight.element_size()
            raise QuantizationOOMError(
                f"layer {name!r}: out of memory on {qdev} while quantizing a [{n}x{k}] weight "
                f"({need} bytes in, plus the packed result); free memory or load with quantization 'none'"
            ) from None
        finally:
            del w
        state.quantize_seconds += time.perf_counter() - t0
        d = state.plan.decision(name)
        record = LayerRecord(
            name,
            n,
            k,
            True,
            d.reason,
            d.source,
            weight.numel() * weight.element_size(),
            packed_nbytes(qt),
            sqnr,
            self._oq_compute,
        )
        state.records.append(record)
        if defer:
            state.queue(record, finite, sums, qdev)
        return qt

    def _apply(self, fn, recurse=True):
        # nn.Module._apply swaps `.data`, which a wrapper subclass does not support: rebuild the
        # parameters instead (as comfy.ops.mixed_precision_ops does). Meta placeholders of layers
        # that were never loaded stay as they are.
        for key, param in self._parameters.items():
            if param is None or param.device.type == "meta":
                continue
            self.register_parameter(key, torch.nn.Parameter(fn(param), requires_grad=False))
        for key, buf in self._buffers.items():
            if buf is not None:
                self._buffers[key] = fn(buf)
        return self

    # ---- LoRA / lowvram contract -----------------------------------------------------------
    def convert_weight(self, weight, inplace=False, **kwargs):
        if isinstance(weight, QuantizedTensor):
            return weight.dequantize()
        return weight

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        # seed: ComfyUI's stochastic-rounding seed; requantization here is deterministic.
        if self._oq_format is not None:
            new = quantize_to_tensor(weight, self._oq_format, self._oq_dtype, self._oq_compute)
        else:
            new = weight.to(dtype=self.weight.dtype)
        if return_weight:
            return new
        if inplace_update:
            if isinstance(self.weight, QuantizedTensor):
                # copy_ on our param object updates both the packed data and the scale in place
                self.weight.copy_(new.to(device=self.weight.device))
            else:
                self.weight.data.copy_(new)
        else:
            self.weight = torch.nn.Parameter(new, requires_grad=False)
        return None

    # ---- forward ---------------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not is_online_quant(weight):
            return torch.nn.functional.linear(x, weight, bias)
        if not torch.compiler.is_compiling():
            return quantized_linear(x, as_quantized_weight(weight), bias, compute=weight._params.compute)
        # Compiled, the forward never reads the layout's params object (`_params`), which Dynamo
        # before torch 2.13 cannot trace: one op carries the weight below Dynamo, where the layout
        # emits the quantized matmul as plain ops (see nodes/layouts.py, LINEAR_OP_NAME). That op
        # has no backward: where a gradient is wanted (training adapters in front of the layer),
        # F.linear runs on the dequantized weight, whose backward is exact.
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return torch.nn.functional.linear(x, weight, bias)
        return torch.ops.onlinequant.linear_quantized_weight(x, weight, bias)

    def forward_comfy_cast_weights(self, input):
        weight, bias, offload_stream = cast_bias_weight(self, input, offloadable=True)
        x = self._linear(input, weight, bias)
        uncast_bias_weight(self, weight, bias, offload_stream)
        return x

    def forward(self, input, *args, **kwargs):
        run_every_op()
        w = self.weight
        if (
            self.comfy_cast_weights
            or len(self.weight_function) > 0
            or len(self.bias_function) > 0
            or self._oq_format is None
            or not isinstance(w, QuantizedTensor)
        ):
            # kept layers always take ComfyUI's cast path: a no-op when dtype and device match
            return self.forward_comfy_cast_weights(input)
        if w.device != input.device:
            w = w.to(device=input.device)
        bias = self.bias
        if bias is not None and (bias.device != input.device or bias.dtype != input.dtype):
            bias = bias.to(device=input.device, dtype=input.dtype)
        return self._linear(input, w, bias)


def make_ops(
    plan: Any,
    format_name: str,
    compute_dtype: torch.dtype | None = None,
    *,
    compute: str = "auto",
    quantize_device: torch.device | str | None = None,
    record_sqnr: bool | None = None,
) -> type:
    """A fresh ops class for one load (pass as `model_options["custom_operations"]`).

    plan: quant.selection.plan.QuantPlan (names relative to diffusion_model).
    compute_dtype: unused by the Linear (it follows the model's dtype) and kept for the
        contract; the rest of the model follows comfy.ops.manual_cast.
    quantize_device: where layers are quantized; default: ComfyUI's torch device when it is a
        GPU, else the CPU.
    record_sqnr: measure each quantized weight's SQNR (quant.quality.quantized_weight_sqnr_db on
        256 sampled rows: ~1% of the quantization on CPU, see `python -m quant.bench.quality
        --overhead`); default on.
    """
    register_layouts()
    if quantize_device is None:
        dev = comfy.model_management.get_torch_device()
        quantize_device = dev if dev.type in ("cuda", "xpu") else torch.device("cpu")
    quantize_device = torch.device(quantize_device)
    if record_sqnr is None:
        record_sqnr = True
    state = LoadState(
        plan=plan,
        format=format_name,
        compute=compute,
        quantize_device=quantize_device,
        record_sqnr=record_sqnr,
    )

    class Linear(OnlineQuantLinear):
        _oq_state = state

    class OnlineQuantOps(comfy.ops.manual_cast):
        load_state = state
        compute = compute_dtype

    OnlineQuantOps.Linear = Linear
    return OnlineQuantOps
