"""The loader's opt-in quantized cache (quant/checkpoint/load_cache.py), in ComfyUI's folders.

`load_cached` plans the source file as the loader does, looks its key up, and on a hit loads the
cache file (packed weights read as they are: no quantization); on a miss it loads and quantizes
the source as usual and then writes the cache file from the model: packed weights and scales
from the model, every other tensor copied from the source file as it is there (so a later hit
does not depend on the dtype this load ran in). A damaged cache file is ignored with a warning
and written again. The source file is only ever read.

The folder is ComfyUI's model folder `online_quant_cache` (`models/online_quant_cache` unless
extra_model_paths.yaml names another), so the cache files are not listed among the diffusion
models. Its size limit is `ONLINE_QUANT_CACHE_GB` (environment, GB) or 64 GB.
"""

from __future__ import annotations

import json
import os

from ..quant.checkpoint import classify_checkpoint, iter_tensors, read_header, torch_dtype
from ..quant.checkpoint.load_cache import DEFAULT_MAX_BYTES, QuantizedCache, source_key
from ..quant.checkpoint.packed_file import META_DTYPE, META_LAYERS, scale_key, weight_key
from ..quant.errors import CheckpointError, NonFiniteWeightError
from ..quant.formats import get_format
from ..quant.selection.checkpoint_plan import NO_QUANTIZATION, plan_checkpoint
from ..quant.selection.plan import format_bytes
from .loader import load_quantized
from .ops import LoadState
from .packed import model_packed_contents

CACHE_FOLDER = "online_quant_cache"
MAX_GB_ENV = "ONLINE_QUANT_CACHE_GB"
_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")


def cache_folder() -> str:
    """The cache folder: ComfyUI's `online_quant_cache` model folder (registered on first use)."""
    import folder_paths

    if CACHE_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(CACHE_FOLDER, os.path.join(folder_paths.models_dir, CACHE_FOLDER))
    return folder_paths.get_folder_paths(CACHE_FOLDER)[0]


def cache_max_bytes() -> int:
    try:
        return int(float(os.environ[MAX_GB_ENV]) * (1 << 30))
    except (KeyError, ValueError):
        return DEFAULT_MAX_BYTES


def _why_not_cached(header, kind, quantization: str, keep_sensitive: str | None) -> str | None:
    if header is None:
        return "only .safetensors files are cached"
    if kind.prequantized:
        return "the file is already quantized"
    if quantization == NO_QUANTIZATION:
        return "quantization none"
    if keep_sensitive and keep_sensitive.strip().lower() not in ("none", "off"):
        return "keep_sensitive chooses layers from the bf16 weights, which a cached load does not read"
    return None


def _from_source(tensors: dict, metadata: dict, header) -> None:
    """Replace the plain tensors (taken from the model, in the dtype it ran in) by the source file's
    own tensors where the file has them, and record the source's weight dtype as the logical one."""
    layers = json.loads(metadata[META_LAYERS])
    packed = {k for n in layers for k in (weight_key(n), scale_key(n))}
    where = {}
    for k, t in tensors.items():
        if k in packed:
            continue
        for prefix in _PREFIXES:
            e = header.tensors.get(prefix + k)
            if e is not None and tuple(e.shape) == tuple(t.shape):
                where[prefix + k] = k
                break
    for name, t in iter_tensors(header.path, list(where), header=header):
        tensors[where[name]] = t
    for n in layers:
        for prefix in _PREFIXES:
            e = header.tensors.get(prefix + weight_key(n))
            if e is not None and torch_dtype(e.dtype) is not None:
                metadata[META_DTYPE] = str(torch_dtype(e.dtype)).removeprefix("torch.")
                return


def load_cached(
    unet_path: str,
    quantization: str,
    ignore_text: str | None = None,
    min_out_features: int = 256,
    compute_dtype: str = "auto",
    *,
    folder: str | None = None,
    max_bytes: int | None = None,
    **kwargs,
):
    """`load_quantized` (same arguments, `kwargs` its keywords) through the quantized cache in
    `folder` (default: `cache_folder()`), holding at most `max_bytes` (default: `cache_max_bytes()`).
    -> (ModelPatcher, LoadReport); the report says hit, miss (and what was written) or why not."""
    args = (unet_path, quantization, ignore_text, min_out_features, compute_dtype)
    family, compute, keep_sensitive = (
        kwargs.get("family"),
        kwargs.get("compute", "auto"),
        kwargs.get("keep_sensitive"),
    )
    header = kind = None
    if unet_path.lower().endswith((".safetensors", ".sft")):
        header = read_header(unet_path)
        kind = classify_checkpoint(header)
    why = _why_not_cached(header, kind, quantization, keep_sensitive)
    if why is not None:
        patcher, report = load_quantized(*args, **kwargs)
        report.notes.append(f"quantized cache: not used ({why})")
        return patcher, report
    fmt = get_format(quantization).name
    cp = plan_checkpoint(
        header.shapes(),
        fmt,
        ignore_text,
        family=family or "auto",
        min_out_features=min_out_features,
        kind=kind,
        file=unet_path,
    )
    state = LoadState(plan=cp.plan, format=fmt, compute=compute)
    entries = [(d.name, fmt if d.quantize else None, state.compute_for(d)) for d in cp.plan.decisions]
    key = source_key(header, entries)
    cache = QuantizedCache(folder or cache_folder(), cache_max_bytes() if max_bytes is None else max_bytes)
    damaged = None
    try:
        hit = cache.lookup(key)
        if hit is not None:
            stale = [
                n
                for n, la in hit.info.layers.items()
                if (cp.plan.decision(n) is None or not cp.plan.decision(n).quantize or la.format != fmt)
            ]
            if stale:
                raise CheckpointError(f"{hit.path}: layer {stale[0]!r} is packed but this plan keeps it")
            patcher, report = load_quantized(*args, _cached=hit, **kwargs)
            cache.touch(hit.path)
            report.notes.append(
                f"quantized cache: read {os.path.basename(hit.path)} — no quantization (the packed "
                "weights of an earlier load of this file with this plan)"
            )
            return patcher, report
    except (CheckpointError, NonFiniteWeightError) as e:
        damaged = str(e)
        cache.remove(key)
    patcher, report = load_quantized(*args, **kwargs)
    if damaged is not None:
        report.warnings.append(f"quantized cache: ignored a damaged cache file ({damaged}); writing it again")
    try:
        tensors, metadata = model_packed_contents(patcher.model.diffusion_model)
        _from_source(tensors, metadata, header)
        path, evicted = cache.store(key, tensors, metadata, source=unet_path)
    except (OSError, ValueError, CheckpointError) as e:
        report.warnings.append(f"quantized cache: not written ({e})")
        return patcher, report
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if path is None:
        report.notes.append(
            f"quantized cache: not written (the file would take {format_bytes(size)}, above the cache's "
            f"limit of {format_bytes(cache.max_bytes)}; set {MAX_GB_ENV})"
        )
    else:
        gone = f"; evicted {len(evicted)} least recently used file(s)" if evicted else ""
        report.notes.append(
            f"quantized cache: miss; wrote {os.path.basename(path)} ({format_bytes(size)}){gone}"
        )
    return patcher, report
