"""`load_quantized`: load a diffusion model file through ComfyUI, quantizing Linear layers online.

Plain Python (no node machinery), so the loader node, the compare node, tests and scripts all
call the same function. Steps: read the file with ComfyUI's `load_torch_file`; detect the family
and list the Linear layers from the tensor shapes (quant.selection.plan); build the plan; build a
fresh ops class (nodes/ops.py); let ComfyUI build and load the model with
`model_options["custom_operations"]`, so each layer is quantized as ComfyUI loads it.

The ignored-layers text (node field and `ignore_text` argument) is read by
`quant.selection.user_text.plan_from_text`, as the preview route and the CLI read it.

A failed load raises and leaves nothing behind: no module-level cache holds the partial model,
the state dict is dropped, and the GPU cache is emptied.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import traceback

import comfy.model_management
import comfy.sd
import comfy.utils
import torch

from ..quant.checkpoint import classify_checkpoint, lazy_state_dict, read_header
from ..quant.errors import CheckpointError
from ..quant.formats import FORMATS, get_format
from ..quant.matmul.registry import choose_backend
from ..quant.models import detect_family
from ..quant.selection.plan import linears_from_shapes
from ..quant.selection.user_text import plan_from_text
from .ops import make_ops
from .progress import LoadProgress, linear_weight_bytes
from .report import LayerRecord, LoadReport
from .save import save_dequantized

log = logging.getLogger(__name__)

NO_QUANTIZATION = "none"
COMPUTE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def quantization_choices() -> list[str]:
    """Choices of the loader's `quantization` input: the main formats first, then `none`, then variants."""
    main = [f for f in ("fp8_e4m3fn", "mxfp4") if f in FORMATS]
    return main + [NO_QUANTIZATION] + [f for f in FORMATS if f not in main]


def _shapes(sd: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def _free(device: torch.device | None = None) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _release_pinned()


def _release_pinned() -> None:
    """Give back the pinned host blocks that nodes/ops.py staged weights in (CUDA quantization):
    PyTorch's caching host allocator would otherwise keep them for the life of the process."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        empty()


def _backend(format_name: str, device: torch.device, compute: str) -> tuple[str, str, tuple]:
    """(backend, reason, (backend, why not) pairs) that the matmul registry picks for this format
    on this device."""
    try:
        c = choose_backend(format_name, device, compute)
    except Exception as e:  # a backend probe must never fail the load; the matmul decides later
        return "unknown", f"backend choice failed: {e}", ()
    return f"{c.name} ({c.compute})", c.reason, c.skipped


def load_quantized(
    unet_path: str,
    quantization: str,
    ignore_text: str | None = None,
    min_out_features: int = 256,
    compute_dtype: str = "auto",
    *,
    family: str | None = None,
    compute: str = "auto",
    quantize_device: torch.device | str | None = None,
    record_sqnr: bool | None = None,
    keep_sensitive: str | None = None,
):
    """Load `unet_path` as a ComfyUI MODEL, quantizing its Linear layers. -> (ModelPatcher, LoadReport)

    quantization: a key of quant.formats.FORMATS (or alias), or "none" for a plain load.
    compute_dtype: "auto" (ComfyUI's choice for the device), "bf16", "fp16" or "fp32".
    family: override detection ("zimage", "wan21", "wan22_5b", "generic", ...).
    compute: activation mode for the quantized matmul ("auto" lets quant.matmul.registry decide).
    keep_sensitive: also keep in bf16 the planned layers with the worst estimated weight SQNR
        ("worst 5%", "below 20 dB", "max 12 GB"; quant.quality.plan_with_sensitivity); the
        chosen layers are listed in the report as lines to paste into the ignored layers.
    """
    t0 = time.perf_counter()
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype {compute_dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    dtype = COMPUTE_DTYPES[compute_dtype]
    plain = quantization == NO_QUANTIZATION
    if not plain:
        quantization = get_format(quantization).name  # unknown -> ValueError listing the formats

    name = os.path.basename(unet_path)
    prequantized_note = None
    header = None
    if unet_path.lower().endswith((".safetensors", ".sft")):
        # Validate the header first: LFS pointers, HTML pages, truncated or
        # malformed files get an error naming the file and what it is, before ComfyUI reads it.
        header = read_header(unet_path)
        kind = classify_checkpoint(header)
        if kind.prequantized:
            if not kind.comfyui_loads:
                raise CheckpointError(
                    f"{unet_path}: already quantized ({kind.detail}; e.g. {', '.join(kind.examples)}); "
                    "ComfyUI cannot load it: use the bf16/fp16 file of this model"
                )
            if not plain:
                prequantized_note = (
                    f"the file is already quantized ({kind.detail}): loaded as it is, no online quantization"
                )
                plain = True
    try:
        if header is not None and prequantized_note is None and not kind.prequantized:
            # Tensors read with pread when each layer loads (lazy_state_dict): no mmap, so a
            # file truncated mid-load raises CheckpointError instead of SIGBUS killing ComfyUI,
            # and host RAM holds about one bf16 tensor beyond the (quantized) model.
            sd, metadata = lazy_state_dict(unet_path, header), header.metadata
        else:
            sd, metadata = comfy.utils.load_torch_file(unet_path, return_metadata=True)
    except Exception as e:
        raise CheckpointError(f"{unet_path}: cannot read the model file ({type(e).__name__}: {e})") from e
    shapes = _shapes(sd)
    layers = linears_from_shapes(shapes)
    detected = detect_family(list(shapes), shapes)
    fam = family or detected
    report = LoadReport(model_file=name, format=quantization, family=fam, compute_dtype=compute_dtype)
    if prequantized_note:
        report.notes.append(prequantized_note)
    if family and family != detected:
        report.notes.append(f"family set to {family!r} (detected {detected!r})")
    if fam == "generic":
        report.notes.append(
            "no tuned defaults for this model: generic rules (size threshold, format limits) apply"
        )

    model_options: dict = {}
    if dtype is not None:
        model_options["dtype"] = dtype
    ops = None
    if not plain:
        plan, _ = plan_from_text(layers, quantization, ignore_text, fam, min_out_features)
        if keep_sensitive and keep_sensitive.strip().lower() not in ("none", "off"):
            from ..quant.quality import plan_with_sensitivity

            plan, _, note = plan_with_sensitivity(plan, sd, keep_sensitive, shapes=shapes)
            report.notes.append(note)
        report.warnings.extend(plan.warnings)
        report.plan_summary = plan.summary()
        ops = make_ops(
            plan,
            quantization,
            dtype,
            compute=compute,
            quantize_device=quantize_device,
            record_sqnr=record_sqnr,
        )
        model_options["custom_operations"] = ops
        report.quantize_device = str(ops.load_state.quantize_device)
        ops.load_state.progress = LoadProgress(linear_weight_bytes(sd), name)

    patcher = None
    try:
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=model_options, metadata=metadata)
        if patcher is None:
            raise CheckpointError(f"{unet_path}: ComfyUI does not recognise this file as a diffusion model")
    except BaseException as e:
        patcher = None
        sd = None
        ops = None
        # the traceback's finished frames (ComfyUI's model construction, load_state_dict) still
        # hold the partly loaded model; ComfyUI keeps the exception, so drop their locals now
        traceback.clear_frames(e.__traceback__)
        _free()
        raise
    finally:
        sd = None

    if ops is not None:
        ops.load_state.progress.finish()
        save_dequantized(patcher.model)  # ModelSave/CheckpointSave write plain weights, not packed bytes
        state = ops.load_state
        if state.quantize_device is not None and state.quantize_device.type == "cuda":
            _release_pinned()
        report.layers = list(state.records)
        report.quantize_seconds = state.quantize_seconds
        planned = {d.name for d in state.plan.decisions}
        not_linear = sorted(planned - state.seen)
        q_missing = [n for n in not_linear if state.plan.decision(n).quantize]
        if q_missing:
            report.warnings.append(
                f"{len(q_missing)} planned layer(s) were not loaded as Linear layers of the model and stay "
                f"as ComfyUI made them (e.g. {', '.join(q_missing[:3])})"
            )
        unplanned = [r.name for r in report.layers if r.source == "unplanned"]
        if unplanned:
            report.warnings.append(
                f"{len(unplanned)} Linear layer(s) have names the file does not use (converted checkpoint?) "
                f"and were kept unquantized (e.g. {', '.join(unplanned[:3])})"
            )
        load_device = patcher.load_device
        report.backend, report.backend_reason, report.backends_skipped = _backend(
            quantization, load_device, compute
        )
        log.info(
            "OnlineQuant %s: %s on %s -> backend %s (%s)",
            name,
            quantization,
            load_device,
            report.backend,
            report.backend_reason,
        )
    else:
        # plain load: list the Linear layers as ComfyUI loaded them, for a comparable report
        for mname, m in patcher.model.diffusion_model.named_modules():
            if isinstance(m, torch.nn.Linear) and getattr(m, "weight", None) is not None:
                nb = m.weight.nbytes
                report.layers.append(
                    LayerRecord(
                        mname, m.out_features, m.in_features, False, "quantization none", "none", nb, nb
                    )
                )
    report.load_seconds = time.perf_counter() - t0
    return patcher, report
