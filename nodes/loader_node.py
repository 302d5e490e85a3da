"""The "Load Diffusion Model FP8/MXFP4 (Online Quant)" node: a thin V3 wrapper around `load_quantized`."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io, ui

from ..quant.selection.user_text import AUTO_IGNORE_TEXT
from . import names
from .load_cache import load_cached
from .loader import COMPUTE_DTYPES, load_quantized, quantization_choices
from .reuse import load_or_reuse, plan_key


def validate_loader_inputs(unet_name, quantization, ignored_layers, keep_sensitive) -> bool | str:
    """True, or the message a user sees when the queue refuses the prompt."""
    from ..quant.errors import OnlineQuantError
    from ..quant.quality import parse_sensitivity_rule
    from ..quant.selection.actions import parse_lines
    from ..quant.selection.checkpoint_plan import plan_file

    try:
        if isinstance(keep_sensitive, str) and keep_sensitive.strip().lower() not in ("", "none", "off"):
            parse_sensitivity_rule(keep_sensitive)
        if isinstance(ignored_layers, str):
            parse_lines(ignored_layers)  # syntax, with the line numbers the user typed
        path = (
            folder_paths.get_full_path("diffusion_models", unet_name) if isinstance(unet_name, str) else None
        )
        if path and path.lower().endswith((".safetensors", ".sft")) and isinstance(quantization, str):
            text = ignored_layers if isinstance(ignored_layers, str) else None
            plan_file(path, quantization, text, file=unet_name)
    except (OnlineQuantError, ValueError) as e:
        return str(e)
    return True


class OnlineQuantDiffusionLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=names.LOADER,
            display_name=names.DISPLAY_NAMES[names.LOADER],
            **names.search_alias_kwargs(io.Schema, names.LOADER),
            category=names.CATEGORY,
            description=(
                "Loads a bf16/fp16 diffusion model (Z-Image, Wan 2.1/2.2, or any model ComfyUI can load) "
                "and quantizes its Linear layers to FP8 or MXFP4 while loading. "
                "Drop-in for 'Load Diffusion Model'."
            ),
            inputs=[
                io.Combo.Input(
                    "unet_name",
                    options=folder_paths.get_filename_list("diffusion_models"),
                    tooltip="A model file from models/diffusion_models (bf16 or fp16 safetensors).",
                ),
                io.Combo.Input(
                    "quantization",
                    options=quantization_choices(),
                    default=quantization_choices()[0],
                    tooltip=(
                        "fp8_e4m3fn: 8-bit, per-channel scales, FP8 tensor cores on NVIDIA sm_89+ / MI350. "
                        "mxfp4: 4.25 bits (OCP MX), smallest; native on MI350, weight-only elsewhere. "
                        "fp8_e4m3fnuz: for MI300 (gfx942). none: load unquantized."
                    ),
                ),
                io.String.Input(
                    "ignored_layers",
                    multiline=True,
                    default=AUTO_IGNORE_TEXT,
                    tooltip=(
                        "Layers kept in high precision, one pattern per line ('#' comments). "
                        "'# auto' on the first line = the detected model's defaults (plus any patterns "
                        "below it); an empty field = quantize every eligible layer. 'attention' matches "
                        "whole name segments, "
                        "'layers.*.ffn' globs one segment, 're:' starts a regex. A line starting "
                        "'weights-only:' quantizes its layers' weights but keeps their activations in "
                        "the compute dtype; 'quantize:' quantizes both; the last matching line decides."
                    ),
                ),
                io.Int.Input(
                    "min_out_features",
                    default=256,
                    min=0,
                    max=1 << 20,
                    tooltip="Linear layers with fewer output features than this stay in high precision.",
                ),
                io.Combo.Input(
                    "compute_dtype",
                    options=[k for k in COMPUTE_DTYPES if k != "fp32"],
                    default="auto",
                    tooltip="dtype of activations and kept layers; auto = ComfyUI's choice for the device.",
                ),
                io.String.Input(
                    "keep_sensitive",
                    default="none",
                    tooltip=(
                        "Also keep in bf16 the planned layers with the worst measured weight error: "
                        "'none', 'worst 5%', 'below 20 dB', 'max 12 GB' (the bytes the model may take); "
                        "combine with commas. The chosen layers are listed in the report as lines you can "
                        "paste into ignored_layers. Costs one extra read of the Linear weights."
                    ),
                ),
                io.Boolean.Input(
                    "quantized_cache",
                    default=False,
                    optional=True,
                    tooltip=(
                        "Keep the quantized weights of this file and plan in models/online_quant_cache: "
                        "the next load of the same file with the same plan reads them instead of "
                        "quantizing again. A changed file or plan is quantized anew; the folder is "
                        "capped (ONLINE_QUANT_CACHE_GB, default 64) by dropping the least recently used."
                    ),
                ),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            outputs=[
                io.Model.Output(tooltip="The quantized model, usable as any MODEL (LoRA, lowvram, compile)."),
                io.String.Output(display_name="report", tooltip="Layers quantized/kept, bytes, backend."),
            ],
        )

    @classmethod
    def validate_inputs(cls, unet_name, quantization, ignored_layers, keep_sensitive="none"):
        """Refuse a bad pattern (naming its line), a file the loader would refuse, or a bad
        keep_sensitive rule when the prompt is queued, with the preview's message, instead of
        failing at run time. Reads only the file's header."""
        return validate_loader_inputs(unet_name, quantization, ignored_layers, keep_sensitive)

    @classmethod
    def execute(
        cls,
        unet_name,
        quantization,
        ignored_layers,
        min_out_features,
        compute_dtype,
        keep_sensitive="none",
        quantized_cache=False,
    ):
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        load = load_cached if quantized_cache else load_quantized
        key = plan_key(path, quantization, ignored_layers, min_out_features, compute_dtype, keep_sensitive)
        hidden = cls.hidden
        model, report, reused = load_or_reuse(
            hidden.unique_id if hidden is not None else None,
            key,
            lambda: load(
                path,
                quantization,
                ignored_layers,
                min_out_features,
                compute_dtype,
                keep_sensitive=keep_sensitive,
            ),
            set(hidden.prompt) if hidden is not None and isinstance(hidden.prompt, dict) else None,
        )
        text = report.to_text()
        if reused:
            text += "\nnote: the same plan as the model already loaded: reused it, nothing was loaded again"
        return io.NodeOutput(model, text, ui=ui.PreviewText(text))
