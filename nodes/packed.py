"""A quantized MODEL to and from the pack's packed file (quant/checkpoint/packed_file.py): the
tensors and metadata of a loaded model, and a packed file's state dict made ready for ComfyUI.

Both directions keep the packed bytes as they are: saving takes each `OnlineQuantTensor`'s data
and scale, loading wraps the file's data and scale back into one, so a saved and reloaded model
holds bit-identical weights and computes the same outputs.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from ..quant.checkpoint.packed_file import PackedFileInfo, packed_file_contents, scale_key, weight_key
from .layouts import (
    OnlineQuantParams,
    OnlineQuantTensor,
    as_quantized_weight,
    is_online_quant,
    layout_for_format,
    register_layouts,
)
from .ops import OnlineQuantLinear


def fold_packed_weights(sd: MutableMapping[str, torch.Tensor], info: PackedFileInfo) -> None:
    """Replace each packed layer's `weight` + `weight_scale` entries of `sd` (as read from the
    file, lazily) by ONE `OnlineQuantTensor` of the layer's logical shape and dtype. ComfyUI then
    detects the model from the logical shapes (an MXFP4 weight is [N, K/2] bytes in the file) and
    our Linear takes the packed weight as it is (nodes/ops.py): nothing is quantized again. The
    bytes stay unread here; the Linear reads them when it loads the layer."""
    register_layouts()
    dtype = getattr(torch, info.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = torch.bfloat16
    for layer in info.layers.values():
        qdata, scale = sd.pop(weight_key(layer.name)), sd.pop(scale_key(layer.name))
        params = OnlineQuantParams(
            scale=scale,
            orig_dtype=dtype,
            orig_shape=layer.shape,
            format=layer.format,
            compute=layer.compute,
        )
        sd[weight_key(layer.name)] = OnlineQuantTensor(qdata, layout_for_format(layer.format), params)


def _load_state(diffusion_model: torch.nn.Module):
    """The LoadState of the load that built this model (nodes/ops.py), or None."""
    for m in diffusion_model.modules():
        state = getattr(m, "_oq_state", None)
        if state is not None:
            return state
    return None


def model_packed_contents(diffusion_model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the packed file of a loaded model's diffusion model, its weights as
    they are now (patches applied by the caller). Raises ValueError when no layer is packed."""
    from ..quant.models import detect_family

    sd = diffusion_model.state_dict()
    packed, kept = {}, []
    for name, m in diffusion_model.named_modules():
        if isinstance(m, OnlineQuantLinear) and m.weight.device.type != "meta":
            if is_online_quant(m.weight):
                packed[name] = None
            else:
                kept.append(name)
    plain = {}
    for k, v in sd.items():
        layer = k[: -len(".weight")] if k.endswith(".weight") else None
        if layer in packed and is_online_quant(v):
            packed[layer] = (as_quantized_weight(v), v._params.compute)
        else:
            plain[k] = v
    if not packed or any(v is None for v in packed.values()):
        raise ValueError("the model has no layers quantized by Online Quant")
    state = _load_state(diffusion_model)
    family = state.plan.family if state is not None and state.plan is not None else ""
    if not family:
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        family = detect_family(list(shapes), shapes)
    dtype = next(v._params.orig_dtype for v in sd.values() if is_online_quant(v))
    return packed_file_contents(
        plain,
        packed,
        kept,
        family=family,
        dtype=dtype,
        source=getattr(state, "source", "") if state is not None else "",
    )
