"""The "Save Quantized Model (Online Quant)" node: writes a quantized MODEL's packed weights and
scales as they are, with the plan and format in the header (quant/checkpoint/packed_file.py), to
ComfyUI's output folder. The pack's loader reads such a file back without quantizing again.

Patches are saved applied, as ComfyUI's ModelSave saves them: the model is loaded through
`load_models_gpu(..., force_patch_weights=True)` (a LoRA'd layer is dequantized, patched and
quantized again, in its format, by ComfyUI's own weight patching), then its state dict is written.
The saved weights are what the patched model computes with; the cached model gets its unpatched
weights back when ComfyUI next unpatches it, as after ModelSave.
"""

from __future__ import annotations

import json
import logging
import os

import comfy.model_management
import folder_paths
from comfy_api.latest import io, ui

from ..quant.checkpoint.packed_file import (
    LOADER_NODE,
    META_FORMAT,
    META_LAYERS,
    META_PLAN_HASH,
    write_packed_file,
)
from ..quant.selection.plan import format_bytes
from . import names
from .packed import model_packed_contents

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "diffusion_models/OnlineQuant"


def save_quantized_model(model, filename_prefix: str, output_dir: str) -> tuple[str, str]:
    """Write `model` (a ModelPatcher loaded by this pack) as a packed file under `output_dir`,
    named as ModelSave names its files. -> (path, one-line summary)."""
    folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
    path = os.path.join(folder, f"{filename}_{counter:05}_.safetensors")
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    try:
        tensors, metadata = model_packed_contents(model.model.diffusion_model)
    except ValueError:
        raise ValueError(
            f"{names.DISPLAY_NAMES[names.SAVE_QUANTIZED]}: the model has no layers quantized by this pack "
            f"(load it with '{LOADER_NODE}' to quantize it); save a model that is not quantized with "
            "ComfyUI's 'ModelSave' node"
        ) from None
    os.makedirs(folder, exist_ok=True)
    write_packed_file(path, tensors, metadata)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    layers = len(json.loads(metadata[META_LAYERS]))
    summary = (
        f"saved {os.path.relpath(path, output_dir)}: {layers} layers packed as {metadata[META_FORMAT]}, "
        f"{format_bytes(size)}, plan sha256 {metadata[META_PLAN_HASH][:12]}"
    )
    log.info("OnlineQuant %s", summary)
    return path, summary


class OnlineQuantSaveQuantized(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=names.SAVE_QUANTIZED,
            display_name=names.DISPLAY_NAMES[names.SAVE_QUANTIZED],
            **names.search_alias_kwargs(io.Schema, names.SAVE_QUANTIZED),
            category=names.CATEGORY,
            description=(
                "Saves a model quantized by the Online Quant loader with its packed FP8/MXFP4 weights "
                "(LoRA and other patches applied), so the next load reads them instead of quantizing "
                "again. Load the file with the Online Quant loader."
            ),
            inputs=[
                io.Model.Input(
                    "model", tooltip="A model from the Online Quant loader (LoRA applied if any)."
                ),
                io.String.Input(
                    "filename_prefix",
                    default=DEFAULT_PREFIX,
                    tooltip=(
                        "Where in ComfyUI's output folder, as for ModelSave. Move the file to "
                        "models/diffusion_models to load it."
                    ),
                ),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix) -> io.NodeOutput:
        _, summary = save_quantized_model(model, filename_prefix, folder_paths.get_output_directory())
        return io.NodeOutput(ui=ui.PreviewText(summary))
