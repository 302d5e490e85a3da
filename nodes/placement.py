"""Where a load keeps the packed weights it makes.

ComfyUI builds a diffusion model on its offload device (the CPU) unless free VRAM exceeds free
RAM, and copies it to the GPU when a sampler first needs it. The pack quantizes each Linear on
the GPU, so handing the packed weight back to the CPU only for ComfyUI to copy it to the GPU
again costs two transfers and a synchronisation per layer: on an H100, 1.1–1.4 s of the 5–6 s a
quantized load of a 10 GB file spent beyond ComfyUI's plain load (docs/benchmarks.md, "Load
time"), before the copy back when the model is first used. When the
quantized model fits on the GPU with room to spare, its packed weights stay where they were made.

"Room to spare" is deliberately strict: ComfyUI's memory accounting does not know the weights
are already there, so when it next loads the model it asks for their size again; with at least
twice the model's size free (plus ComfyUI's inference reserve), that request is met and ComfyUI
loads the model fully instead of switching it to partial (lowvram) loading.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def choose_packed_device(
    quantize_device: torch.device | None, model_bytes: int, free_bytes: int, reserve_bytes: int, vram_ok: bool
) -> tuple[torch.device | None, str]:
    """(device for the packed weights or None = the module's own device, why). Pure: the caller
    reads ComfyUI's state (`packed_device`)."""
    if quantize_device is None or quantize_device.type != "cuda":
        return None, "quantized on the CPU"
    if not vram_ok:
        return None, "ComfyUI runs in low-VRAM mode: packed weights go to ComfyUI's offload device"
    need = 2 * model_bytes + reserve_bytes
    gib = 1024**3
    if free_bytes < need:
        return None, (
            f"the quantized model ({model_bytes / gib:.2f} GiB) does not fit twice in free VRAM "
            f"({free_bytes / gib:.2f} GiB): packed weights go to ComfyUI's offload device"
        )
    return quantize_device, f"packed weights stay on {quantize_device} ({model_bytes / gib:.2f} GiB)"


def packed_device(quantize_device: torch.device | None, model_bytes: int) -> tuple[torch.device | None, str]:
    """`choose_packed_device` with ComfyUI's view of the GPU: free VRAM, its inference reserve,
    and whether it runs in normal/high-VRAM mode."""
    import comfy.model_management as mm

    if quantize_device is None or quantize_device.type != "cuda":
        return choose_packed_device(quantize_device, model_bytes, 0, 0, False)
    vram_ok = mm.vram_state in (mm.VRAMState.NORMAL_VRAM, mm.VRAMState.HIGH_VRAM, mm.VRAMState.SHARED)
    free = mm.get_free_memory(quantize_device)
    return choose_packed_device(quantize_device, model_bytes, free, mm.minimum_inference_memory(), vram_ok)


def quantized_model_bytes(sd: Mapping[str, torch.Tensor], plan: Any) -> int:
    """Bytes of the model once loaded: every tensor of the state dict as it is, with the Linear
    weights the plan quantizes counted packed (`QuantPlan.bytes_after`) instead of in the file's
    dtype (shapes and dtypes only; nothing is read)."""
    tensors = [v for v in sd.values() if hasattr(v, "element_size")]
    total = sum(v.numel() * v.element_size() for v in tensors)
    # the Linear weights' element size in the file (keys may carry a prefix the plan's names lack)
    esize = next((v.element_size() for v in tensors if v.dim() == 2 and v.is_floating_point()), 2)
    return max(total - plan.bytes_before(esize) + plan.bytes_after(esize), 0)


__all__ = ["choose_packed_device", "packed_device", "quantized_model_bytes"]
