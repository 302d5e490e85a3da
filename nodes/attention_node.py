"""The "Attention Backend (Online Quant)" node: MODEL in, a clone with another attention out."""

from __future__ import annotations

from comfy_api.latest import io

from . import names
from .attention import apply_attention_backend, backend_choices


class OnlineQuantAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=names.ATTENTION,
            display_name=names.DISPLAY_NAMES[names.ATTENTION],
            **names.search_alias_kwargs(io.Schema, names.ATTENTION),
            category=names.CATEGORY,
            description="Switches the attention implementation of one model (a clone; input unchanged).",
            inputs=[
                io.Model.Input("model", tooltip="The model whose attention to switch."),
                io.Combo.Input(
                    "backend",
                    options=backend_choices(),
                    default="auto",
                    tooltip=(
                        "auto: flash_attn_2 on AMD ROCm when flash-attn is installed, cuDNN SDPA on "
                        "NVIDIA Hopper+, "
                        "PyTorch SDPA elsewhere. comfy_default: ComfyUI's own choice. A backend that is not "
                        "installed is an error naming the package. Masked, fp32 or too-large-head calls fall "
                        "back to ComfyUI's attention (one warning per model). cudnn_fp8: experimental cuDNN "
                        "FP8 attention (needs nvidia-cudnn-frontend, Hopper/Blackwell): 1.24-1.38x cuDNN "
                        "bf16 at Wan sizes on an H100, no faster at Z-Image, ~6% output error (16-19% with "
                        "outlier channels); auto never picks it."
                    ),
                ),
            ],
            outputs=[io.Model.Output(tooltip="A clone of the model using the chosen attention.")],
        )

    @classmethod
    def execute(cls, model, backend) -> io.NodeOutput:
        m, _, _ = apply_attention_backend(model, backend)
        return io.NodeOutput(m)
