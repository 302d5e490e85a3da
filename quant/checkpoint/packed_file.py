"""The pack's own file of an already-quantized diffusion model ("Save Quantized Model"): key names,
header metadata, versioning, writing, and reading back what a file says about itself.

A packed file is a plain safetensors file with the diffusion model's own (bare) key names:
- a quantized Linear `L` is two tensors, exactly as the format holds them in memory:
  `L.weight` (the packed data: FP8 [N, K], or MXFP4 uint8 codes [N, K/2]) and `L.weight_scale`
  (FP8 fp32 [N, 1] or [], MXFP4 uint8 E8M0 [N, K/32]), never dequantized or repacked;
- every other tensor (kept Linear layers, norms, biases, embeddings) as the model holds it;
- `__metadata__` (strings): `online_quant.format_version` (this module's `FORMAT_VERSION`),
  `online_quant.format`, `online_quant.layers` (JSON: per quantized layer its format, compute
  mode and logical [N, K]), `online_quant.plan` (one line per Linear layer: name, format or
  `keep`, compute mode) and `online_quant.plan_sha256`, `online_quant.family`,
  `online_quant.dtype` (the logical dtype), `online_quant.source` (the file it was loaded from);
- `_quantization_metadata`: ComfyUI's own per-layer table, so that stock ComfyUI reads the file
  through its mixed-precision loader. A format stored exactly as ComfyUI's (per-tensor FP8 e4m3fn:
  `WeightFormat.comfyui_name`) is named as ComfyUI names it, with `full_precision_matrix_mult`
  (ComfyUI dequantizes the weight instead of quantizing activations with no scale). Every other
  format is named by `STOCK_REFUSAL`, a sentence that is no ComfyUI format, so stock ComfyUI stops
  at load time with a KeyError that says which node loads the file. Without the table stock
  ComfyUI would load FP8 codes as plain weights (NaN) or fail on MXFP4 shapes.

A reader accepts files of `FORMAT_VERSION` or older; a newer file is refused with a message
that asks for a newer pack, never guessed at. Nothing here imports torch or the formats until a
function needs them, so header-only callers (the plan preview) stay light.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .header import SafetensorsHeader, _short

if TYPE_CHECKING:
    import torch

    from ..formats import QuantizedWeight

FORMAT_VERSION = 1
PREFIX = "online_quant."
META_VERSION = PREFIX + "format_version"
META_FORMAT = PREFIX + "format"
META_LAYERS = PREFIX + "layers"
META_PLAN = PREFIX + "plan"
META_PLAN_HASH = PREFIX + "plan_sha256"
META_FAMILY = PREFIX + "family"
META_DTYPE = PREFIX + "dtype"
META_SOURCE = PREFIX + "source"
COMFY_QUANT_META = "_quantization_metadata"
SCALE_SUFFIX = "weight_scale"
KEEP = "keep"
LOADER_NODE = "Load Diffusion Model FP8/MXFP4 (Online Quant)"
STOCK_REFUSAL = (
    "{format} (saved by ComfyUI-OnlineQuant; ComfyUI's own loaders cannot read it: load this file "
    f"with the '{LOADER_NODE}' node)"
)


@dataclass(frozen=True)
class PackedLayer:
    """One quantized Linear of a packed file: its format, compute mode and logical [N, K]."""

    name: str
    format: str
    compute: str
    shape: tuple[int, int]


@dataclass(frozen=True)
class PackedFileInfo:
    """What a packed file's header says (checked against its tensors by `read_packed_info`)."""

    path: str
    version: int
    format: str
    family: str
    dtype: str
    layers: dict[str, PackedLayer]
    kept: tuple[str, ...]
    plan_text: str
    plan_hash: str
    source: str

    def describe(self) -> str:
        return f"format {self.format}, file format version {self.version}"


def weight_key(layer: str) -> str:
    return f"{layer}.weight"


def scale_key(layer: str) -> str:
    return f"{layer}.{SCALE_SUFFIX}"


def plan_text(entries: Iterable[tuple[str, str | None, str]]) -> str:
    """The effective plan as text: one `name<TAB>format<TAB>compute` line per Linear layer, sorted
    by name (`keep<TAB>-` for a kept layer). One text for one plan, so its hash identifies it."""
    lines = []
    for name, fmt, compute in sorted(entries, key=lambda e: e[0]):
        lines.append(f"{name}\t{fmt}\t{compute or 'auto'}" if fmt else f"{name}\t{KEEP}\t-")
    return "\n".join(lines) + "\n"


def plan_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _stock_format(format_name: str) -> str:
    from ..formats import get_format

    return get_format(format_name).comfyui_name or STOCK_REFUSAL.format(format=format_name)


def packed_file_contents(
    plain: Mapping[str, torch.Tensor],
    packed: Mapping[str, tuple[QuantizedWeight, str]],
    kept: Iterable[str],
    *,
    family: str,
    dtype: torch.dtype,
    source: str = "",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a packed file. `plain`: every tensor kept as it is (bare names);
    `packed`: quantized layer name -> (its QuantizedWeight, its compute mode); `kept`: the names
    of the Linear layers that are not quantized (for the plan). Tensors go to the CPU, contiguous."""
    tensors = {k: v.detach().to(device="cpu").contiguous() for k, v in plain.items()}
    layers: dict[str, dict] = {}
    for name, (qw, compute) in packed.items():
        compute = compute or "auto"
        for key in (weight_key(name), scale_key(name)):
            if key in tensors:
                raise ValueError(f"layer {name!r}: {key!r} is both a plain and a packed tensor")
        tensors[weight_key(name)] = qw.qdata.detach().to(device="cpu").contiguous()
        tensors[scale_key(name)] = qw.scale.detach().to(device="cpu").contiguous()
        layers[name] = {"format": qw.format, "compute": compute, "shape": [int(d) for d in qw.shape]}
    text = plan_text(
        [(n, layer["format"], layer["compute"]) for n, layer in layers.items()]
        + [(n, None, "") for n in kept]
    )
    formats = sorted({layer["format"] for layer in layers.values()})
    stock = {
        n: {"format": _stock_format(layer["format"]), "full_precision_matrix_mult": True}
        for n, layer in layers.items()
    }
    metadata = {
        META_VERSION: str(FORMAT_VERSION),
        META_FORMAT: ",".join(formats),
        META_LAYERS: json.dumps(layers, sort_keys=True),
        META_PLAN: text,
        META_PLAN_HASH: plan_hash(text),
        META_FAMILY: family,
        META_DTYPE: str(dtype).removeprefix("torch."),
        META_SOURCE: os.path.basename(source),
        COMFY_QUANT_META: json.dumps({"format_version": "1.0", "layers": stock}, sort_keys=True),
    }
    return tensors, metadata


def write_packed_file(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write with the safetensors library into a temporary file beside `path`, then rename it: a
    reader never sees a half-written file under the final name (a crash leaves only the temp)."""
    from safetensors.torch import save_file

    p = os.fspath(path)
    tmp = f"{p}.{os.getpid()}.partial"
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata))
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def is_packed_file(metadata: Mapping[str, str]) -> bool:
    """Whether a header's metadata says the file is a packed file of this pack (any version)."""
    return META_VERSION in metadata


def _fail(path: str, why: str) -> CheckpointError:
    reason = f"a file saved by 'Save Quantized Model (Online Quant)', but {why}"
    return CheckpointError(f"{path}: {reason}", path=path, reason=reason)


def read_packed_info(header: SafetensorsHeader) -> PackedFileInfo | None:
    """What a packed file says about itself, checked against its tensors; None when the file is
    not one. A packed file whose metadata is damaged or edited, whose tensors do not fit their
    format, or that a newer pack wrote, is a CheckpointError naming the file and the layer."""
    meta, path = header.metadata, header.path
    if not is_packed_file(meta):
        return None
    raw = meta[META_VERSION]
    if not raw.isdigit():
        raise _fail(path, f"its format version {_short(raw)} is not a number (damaged metadata)")
    version = int(raw)
    if version > FORMAT_VERSION:
        raise _fail(
            path,
            f"in file format version {version}, newer than this pack reads (up to {FORMAT_VERSION}): "
            "update ComfyUI-OnlineQuant",
        )
    missing = [k for k in (META_LAYERS, META_PLAN, META_PLAN_HASH) if k not in meta]
    if missing:
        raise _fail(path, f"its metadata lacks {', '.join(missing)} (damaged or edited file)")
    text = meta[META_PLAN]
    if plan_hash(text) != meta[META_PLAN_HASH]:
        raise _fail(path, "its plan does not match the plan's hash (damaged or edited metadata)")
    try:
        table = json.loads(meta[META_LAYERS])
        layers = {
            n: PackedLayer(n, str(v["format"]), str(v["compute"]), (int(v["shape"][0]), int(v["shape"][1])))
            for n, v in table.items()
        }
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        raise _fail(path, f"its {META_LAYERS} entry is not a valid layer table (damaged metadata)") from None
    kept = []
    for line in text.splitlines():
        name, fmt, compute = (line.split("\t") + ["", "", ""])[:3]
        if fmt == KEEP:
            kept.append(name)
            continue
        layer = layers.get(name)
        if layer is None or (layer.format, layer.compute) != (fmt, compute):
            raise _fail(
                path, f"its plan and its layer table disagree on layer {_short(name)} (edited metadata)"
            )
    if len(text.splitlines()) - len(kept) != len(layers):
        raise _fail(path, "its layer table lists layers its plan does not (edited metadata)")
    for layer in layers.values():
        _check_layer(header, layer)
    formats = sorted({la.format for la in layers.values()})
    return PackedFileInfo(
        path=path,
        version=version,
        format=meta.get(META_FORMAT) or ",".join(formats),
        family=meta.get(META_FAMILY, ""),
        dtype=meta.get(META_DTYPE, "bfloat16"),
        layers=layers,
        kept=tuple(kept),
        plan_text=text,
        plan_hash=meta[META_PLAN_HASH],
        source=meta.get(META_SOURCE, ""),
    )


def _check_layer(header: SafetensorsHeader, layer: PackedLayer) -> None:
    """The layer's two tensors are there with the shapes and dtypes its format packs into."""
    from ..errors import UnknownFormatError
    from ..formats import get_format
    from .reader import torch_dtype

    path, name = header.path, _short(layer.name)
    try:
        fmt = get_format(layer.format)
    except UnknownFormatError:
        raise _fail(
            path,
            f"layer {name} is in format {_short(layer.format)}, which this pack does not know "
            "(saved by a newer version?): update ComfyUI-OnlineQuant",
        ) from None
    expected = fmt.packed_layout(*layer.shape)
    for key, (shape, dtype) in zip((weight_key(layer.name), scale_key(layer.name)), expected, strict=True):
        e = header.tensors.get(key)
        if e is None:
            raise _fail(path, f"tensor {_short(key)} of layer {name} is missing")
        if e.shape != tuple(shape) or torch_dtype(e.dtype) != dtype:
            raise _fail(
                path,
                f"tensor {_short(key)} is {e.dtype} {list(e.shape)}, but {layer.format} packs a "
                f"{list(layer.shape)} weight as {str(dtype).removeprefix('torch.')} {list(shape)} "
                "(damaged file)",
            )


def logical_shapes(info: PackedFileInfo, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The file's tensor shapes as the model sees them: each packed weight at its logical [N, K],
    its scale left out (for planning and model detection)."""
    out = dict(shapes)
    for layer in info.layers.values():
        out[weight_key(layer.name)] = layer.shape
        out.pop(scale_key(layer.name), None)
    return out


__all__ = [
    "FORMAT_VERSION",
    "PackedFileInfo",
    "PackedLayer",
    "is_packed_file",
    "logical_shapes",
    "packed_file_contents",
    "plan_hash",
    "plan_text",
    "read_packed_info",
    "scale_key",
    "weight_key",
    "write_packed_file",
]
