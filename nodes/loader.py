"""`load_quantized`: load a diffusion model file through ComfyUI, quantizing Linear layers online.

Plain Python (no node machinery), so the loader node, the compare node, tests and scripts all
call the same function. Steps: read the header and plan the file with
`quant.selection.checkpoint_plan.plan_checkpoint` (the web preview and the CLI call the same
function, so the three agree on every file: planned alike, or refused with the same message);
build a fresh ops class (nodes/ops.py); let ComfyUI build and load the model with
`model_options["custom_operations"]`, so each layer is quantized as ComfyUI loads it.

Every safetensors file is read with positioned reads, never memory-mapped (a file truncated
mid-load is a CheckpointError, not SIGBUS), and every floating-point tensor read is checked for
NaN/Inf where it is read.

A failed load raises and leaves nothing behind: no module-level cache holds the partial model,
the file is closed, the exception's frames let go of the state dict and the half-built model
(so they are freed at once, not at the next garbage collection), and the GPU cache is emptied.
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

from ..quant.checkpoint import classify_checkpoint, lazy_state_dict, read_header, read_packed_info
from ..quant.checkpoint.reader import all_finite, non_finite_error
from ..quant.errors import CheckpointError, HeaderTooLargeError, OnlineQuantError
from ..quant.formats import FORMATS, get_format
from ..quant.matmul.registry import choose_backend
from ..quant.selection.checkpoint_plan import NO_QUANTIZATION, plan_checkpoint
from ..quant.selection.plan import format_bytes
from .ops import make_ops
from .packed import fold_packed_weights
from .placement import packed_device, quantized_model_bytes
from .progress import LoadProgress, linear_weight_bytes
from .report import LayerRecord, LoadReport
from .save import save_dequantized

log = logging.getLogger(__name__)

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


# Already-quantized files: tensors up to this size (scales, `comfy_quant` configs, biases) are read
# at once into plain tensors, because ComfyUI reads some of them through `.numpy()`.
_EAGER_BYTES = 1 << 20
# A diffusion model's header is small (Wan 2.1 14B: ~150 KB for ~1,100 tensors); 8 MiB holds some
# 50,000 entries (plan_checkpoint's limit). A 100 MB header took ~35 s and ~3 GB to be refused.
MAX_HEADER_BYTES = 8 * 1024 * 1024


def _release_failed_load(exc: BaseException, readers: list) -> None:
    """After a failed load: close the file and drop the frames' locals that the exception's
    traceback keeps alive (the state dict, the half-built model), so both go now rather than at
    the next garbage collection, which ComfyUI may not run for several prompts."""
    for reader in readers:
        reader.close()
    readers.clear()
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # the running frame (ours) is skipped
        e = e.__cause__ or e.__context__


def _check_finite_state_dict(sd: dict, path: str) -> list[str]:
    """NaN/Inf in a state dict ComfyUI read (files that are not safetensors): -> names."""
    return [k for k, v in sd.items() if isinstance(v, torch.Tensor) and not all_finite(v)]


def _backend(format_name: str, device: torch.device, compute: str) -> tuple[str, str, tuple]:
    """(backend, reason, (backend, why not) pairs) that the matmul registry picks for this format
    on this device."""
    try:
        c = choose_backend(format_name, device, compute)
    except Exception as e:  # a backend probe must never fail the load; the matmul decides later
        return "unknown", f"backend choice failed: {e}", ()
    return f"{c.name} ({c.compute})", c.reason, c.skipped


def load_quantized(*args, **kwargs):
    """See `_load_quantized` (same arguments). A failed load closes the file and lets go of what
    the exception's frames hold before the exception leaves."""
    opened: list = []
    try:
        return _load_quantized(*args, _opened=opened, **kwargs)
    except BaseException as e:
        # A read error inside `param.copy_` reaches us as the RuntimeError text that
        # `load_state_dict` makes of it: raise the reader's own error (CheckpointError, NaN/Inf).
        first = next((r.error for r in opened if r.error is not None and r.error is not e), None)
        _release_failed_load(e, opened)
        _free()
        if first is not None and isinstance(e, Exception):
            _release_failed_load(first, [])
            raise first from None
        raise


def _load_quantized(
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
    allow_non_finite: bool = False,
    _cached=None,
    _opened: list,
):
    """Load `unet_path` as a ComfyUI MODEL, quantizing its Linear layers. -> (ModelPatcher, LoadReport)

    quantization: a key of quant.formats.FORMATS (or alias), or "none" for a plain load.
    compute_dtype: "auto" (ComfyUI's choice for the device), "bf16", "fp16" or "fp32".
    family: override detection ("zimage", "wan21", "wan22_5b", "generic", ...).
    compute: activation mode for the quantized matmul ("auto" lets quant.matmul.registry decide).
    keep_sensitive: also keep in bf16 the planned layers with the worst estimated weight SQNR
        ("worst 5%", "below 20 dB", "max 12 GB"; quant.quality.plan_with_sensitivity); the
        chosen layers are listed in the report as lines to paste into the ignored layers.
    allow_non_finite: load tensors holding NaN/Inf instead of stopping (the report warns and names
        them); the quantizer still refuses a non-finite weight it must quantize.
    _cached: a quant.checkpoint.load_cache.CacheHit (nodes/load_cache.py): plan the source file as
        usual, read the tensors from that cache file (packed weights as they are) instead.
    """
    t0 = time.perf_counter()
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype {compute_dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    dtype = COMPUTE_DTYPES[compute_dtype]
    plain = quantization == NO_QUANTIZATION
    if not plain:
        quantization = get_format(quantization).name  # unknown -> ValueError listing the formats

    name = os.path.basename(unet_path)
    fmt_name = NO_QUANTIZATION if plain else quantization
    header = kind = cp = packed = None
    if unet_path.lower().endswith((".safetensors", ".sft")):
        # Validate the header first: LFS pointers, HTML pages, truncated or malformed files get an
        # error naming the file and what it is, and the plan (or the refusal) is the preview's and
        # the CLI's, all before ComfyUI reads a byte of tensor data.
        try:
            header = read_header(unet_path, max_header_bytes=MAX_HEADER_BYTES)
        except HeaderTooLargeError as e:
            why = (
                f"{e.reason}: a diffusion model's header is far smaller (Wan 2.1 14B: ~150 KB), so this "
                "file holds hundreds of thousands of tensors; it is not a diffusion model file"
            )
            raise CheckpointError(f"{unet_path}: {why}", path=unet_path, reason=why) from None
        kind = classify_checkpoint(header)
        # a "Save Quantized Model" file: its own plan, its packed weights loaded as they are
        packed = read_packed_info(header) if kind.kind == "online_quant" else None
        cp = plan_checkpoint(
            header.shapes(),
            fmt_name,
            ignore_text,
            family=family or "auto",
            min_out_features=min_out_features,
            kind=kind,
            file=unet_path,
            packed=packed,
        )
    sd = None
    try:
        if header is not None:
            # Tensors read with pread when each layer loads (lazy_state_dict): no mmap, so a
            # file truncated mid-load raises CheckpointError instead of SIGBUS killing ComfyUI,
            # and host RAM holds about one bf16 tensor beyond the (quantized) model.
            src = (_cached.path, _cached.header) if _cached is not None else (unet_path, header)
            sd = lazy_state_dict(
                *src,
                eager_bytes=_EAGER_BYTES if kind.prequantized or _cached is not None else 0,
                check_finite=not allow_non_finite,
            )
            _opened.append(sd.reader)
            metadata = src[1].metadata
            if packed is not None or _cached is not None:
                fold_packed_weights(sd, packed or _cached.info)
        else:
            sd, metadata = comfy.utils.load_torch_file(unet_path, return_metadata=True)
    except OnlineQuantError:
        raise
    except Exception as e:
        raise CheckpointError(f"{unet_path}: cannot read the model file ({type(e).__name__}: {e})") from e
    non_finite: list[str] = []
    if not hasattr(sd, "reader"):  # not read by our reader: check what ComfyUI read
        non_finite = _check_finite_state_dict(sd, unet_path)
        if non_finite and not allow_non_finite:
            raise non_finite_error(unet_path, non_finite[0], tuple(sd[non_finite[0]].shape))
    shapes = _shapes(sd)
    if cp is None:  # not a safetensors file: planned from the state dict ComfyUI read
        cp = plan_checkpoint(
            shapes,
            fmt_name,
            ignore_text,
            family=family or "auto",
            min_out_features=min_out_features,
            file=unet_path,
        )
    plain = not cp.quantize
    if packed is not None:
        quantization = cp.plan.format  # what the file holds, whatever the input asked for
    report = LoadReport(model_file=name, format=quantization, family=cp.family, compute_dtype=compute_dtype)
    report.notes.extend(cp.notes)

    model_options: dict = {}
    if dtype is not None:
        model_options["dtype"] = dtype
    ops = None
    if not plain:
        plan = cp.plan
        if packed is None and keep_sensitive and keep_sensitive.strip().lower() not in ("none", "off"):
            from ..quant.quality import plan_with_sensitivity

            plan, _, note = plan_with_sensitivity(plan, sd, keep_sensitive, shapes=shapes)
            report.notes.append(note)
        report.warnings.extend(cp.warnings)
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
        ops.load_state.source = name
        if packed is not None or _cached is not None:  # packed bytes from a file: checked as they load
            ops.load_state.packed_from_file = set((packed or _cached.info).layers)
        report.quantize_device = str(ops.load_state.quantize_device)
        model_bytes = quantized_model_bytes(sd, plan)
        ops.load_state.packed_device, where = packed_device(ops.load_state.quantize_device, model_bytes)
        log.debug("OnlineQuant %s: %s", name, where)
        ops.load_state.progress = LoadProgress(linear_weight_bytes(sd), name)

    plain_progress = None
    if ops is None and getattr(sd, "reader", None) is not None:
        # a plain load: the bar moves (and Cancel works) as the reader reads each tensor
        plain_progress = LoadProgress(sum(e.nbytes for e in sd.reader.header.tensors.values()), name)
        sd.reader.on_read = plain_progress.advance_and_check
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=model_options, metadata=metadata)
    if patcher is None:
        raise CheckpointError(f"{unet_path}: ComfyUI does not recognise this file as a diffusion model")
    reader = getattr(sd, "reader", None)
    sd = None
    if plain_progress is not None:
        reader.on_read = None
        plain_progress.finish()
    if reader is not None:
        non_finite += reader.non_finite
    if non_finite:
        shown = ", ".join(repr(n) for n in non_finite[:5]) + (" ..." if len(non_finite) > 5 else "")
        report.warnings.append(
            f"non-finite values allowed: {len(non_finite)} tensor(s) hold NaN or Inf ({shown}); "
            "the model may render black frames or noise"
        )

    if ops is not None:
        ops.load_state.settle()  # NaN/Inf verdicts and SQNR of GPU-quantized layers: one sync
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
        log.debug(
            "OnlineQuant %s: %s on %s -> backend %s (%s; not chosen: %s)",
            name,
            quantization,
            load_device,
            report.backend,
            report.backend_reason,
            report.backends_skipped,
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
    log.info(
        "OnlineQuant %s: %s, %d Linear layers quantized, %d kept, %s -> %s, %.1f s",
        name,
        report.format,
        len(report.quantized()),
        len(report.kept()),
        format_bytes(report.linear_bytes_before()),
        format_bytes(report.linear_bytes_after()),
        report.load_seconds,
    )
    return patcher, report
