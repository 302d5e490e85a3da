"""Saving a quantized MODEL with ComfyUI's own nodes (ModelSave, CheckpointSave).

Both call `comfy.sd.save_checkpoint`, which takes `model.model.state_dict_for_saving()` and hands
it to safetensors. A packed weight there is a tensor subclass whose logical dtype and shape are
bf16 [N, K] while its storage holds N*K (FP8) or N*K/2 (MXFP4) bytes: safetensors writes the
logical size from `data_ptr()`, so the file would hold packed bytes followed by whatever memory
comes after them. Instead the model we load saves its quantized layers dequantized to the
model's dtype: a plain file that stock ComfyUI loads, equal to what the quantized model computes
with (LoRA and other patches included, since `save_checkpoint` applies them first).
"""

from __future__ import annotations

from typing import Any

import torch

from .layouts import is_online_quant


def _dequantized(sd: dict[str, Any]) -> dict[str, Any]:
    """Packed weights of `sd` dequantized, each moved to the CPU as it is made: safetensors copies
    to the CPU anyway, and this keeps one layer's worth of high precision on the GPU at a time."""
    out = {}
    for k, v in sd.items():
        if is_online_quant(v):
            v = v.dequantize().to(device="cpu").contiguous()
        out[k] = v
    return out


def save_dequantized(model: torch.nn.Module) -> None:
    """Make `model` (a ComfyUI BaseModel built with our ops) save dequantized weights (idempotent).

    An instance attribute shadows `BaseModel.state_dict_for_saving` for this model only: clones
    of its ModelPatcher share the model, so they save the same way."""
    current = model.state_dict_for_saving
    if getattr(current, "_online_quant_dequantizes", False):
        return

    def state_dict_for_saving(*args, **kwargs):
        return _dequantized(current(*args, **kwargs))

    state_dict_for_saving._online_quant_dequantizes = True
    model.state_dict_for_saving = state_dict_for_saving
