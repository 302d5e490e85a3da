"""Files that are already quantized: a clear error, or for pre-quantized files a clear choice (load
as is, with a note)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from .header import SafetensorsHeader, TensorEntry
from .packed_file import META_FORMAT, META_VERSION, is_packed_file

_FP8 = {"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
_PLAIN_FLOAT = {"BF16", "F16", "F32", "F64"}


@dataclass(frozen=True)
class CheckpointKind:
    """What `classify_checkpoint` found.

    kind:
      "plain"        bf16/fp16/fp32 Linear weights: quantize online as usual;
      "online_quant" saved by this pack's "Save Quantized Model" (quant/checkpoint/packed_file.py):
                     the loader reads its packed weights as they are, no quantization;
      "comfy_quant"  ComfyUI's own mixed-precision file (`<layer>.comfy_quant` tensors or the
                     `_quantization_metadata` entry): ComfyUI loads it as is;
      "scaled_fp8"   ComfyUI's older scaled-FP8 file (`scaled_fp8` marker / `.scale_weight`):
                     ComfyUI converts and loads it as is;
      "fp8"          Linear weights stored in an FP8 dtype without scales: ComfyUI loads it as is;
      "nvfp4"        NVFP4 (`weight_scale_2`): loadable only through ComfyUI's own quant ops;
      "mxfp4"        already packed MXFP4 / FP4 (F4 or F8_E8M0 tensors, uint8 codes with block
                     scales, `_blocks`/`_scales`): ComfyUI cannot load it; needs the bf16 file;
      "int"          integer-quantized (GPTQ/AWQ `qweight`, bitsandbytes `absmax`): same.
    comfyui_loads: whether the loader can load the file as it is (ComfyUI's plain loader, or for
      "online_quant" this pack's own reader): then it loads without online quantization and
      reports `note`; otherwise the loader raises `CheckpointError` with `note`.
    """

    kind: str
    detail: str
    examples: tuple[str, ...] = ()
    comfyui_loads: bool = True

    @property
    def prequantized(self) -> bool:
        return self.kind != "plain"

    @property
    def note(self) -> str:
        if not self.prequantized:
            return self.detail
        ex = f" (e.g. {', '.join(self.examples[:3])})" if self.examples else ""
        if self.kind == "online_quant":
            return f"loaded pre-quantized ({self.detail}) — no quantization"
        if self.comfyui_loads:
            return (
                f"file is already quantized: {self.detail}{ex}; loaded as it is, without online "
                "quantization (load the bf16/fp16 release to quantize it here)"
            )
        return (
            f"file is already quantized: {self.detail}{ex}, which ComfyUI cannot load; use the "
            "bf16/fp16 release of this model (this pack quantizes it as it loads)"
        )


def _linear_weights(h: SafetensorsHeader) -> list[TensorEntry]:
    return [e for n, e in h.tensors.items() if n.endswith(".weight") and len(e.shape) == 2]


def classify_checkpoint(header: SafetensorsHeader) -> CheckpointKind:
    """Tell plain bf16/fp16 files from files that are already quantized, from the header alone.

    Checked in this order (the first match wins): this pack's packed files (which also carry
    ComfyUI's table, for stock ComfyUI), ComfyUI `comfy_quant` markers, ComfyUI `scaled_fp8`
    markers, NVFP4, MXFP4/FP4 packing, integer quantization, FP8 weights.
    """
    names = list(header.tensors)
    meta = header.metadata
    if is_packed_file(meta):
        detail = f"format {meta.get(META_FORMAT, '?')}, file format version {meta[META_VERSION]}"
        return CheckpointKind("online_quant", detail, ("__metadata__." + META_VERSION,))

    def ex(pred) -> tuple[str, ...]:
        return tuple(n for n in names if pred(n))[:3]

    cq = ex(lambda n: n.endswith(".comfy_quant"))
    if cq or "_quantization_metadata" in meta:
        formats = _comfy_quant_formats(meta)
        detail = "ComfyUI mixed-precision quantization (comfy_quant)" + (
            f", formats {', '.join(formats)}" if formats else ""
        )
        return CheckpointKind("comfy_quant", detail, cq or ("__metadata__._quantization_metadata",))
    sf = ex(lambda n: n == "scaled_fp8" or n.endswith(".scaled_fp8") or n.endswith(".scale_weight"))
    if sf:
        return CheckpointKind("scaled_fp8", "ComfyUI scaled FP8 (scaled_fp8 / scale_weight)", sf)
    nv = ex(lambda n: n.endswith(".weight_scale_2"))
    if nv:
        return CheckpointKind("nvfp4", "NVFP4 (two-level scales, weight_scale_2)", nv)
    mx = ex(lambda n: header.tensors[n].dtype in ("F4", "F8_E8M0", "F6_E2M3", "F6_E3M2")
            or n.endswith(("_blocks", ".blocks")))
    if not mx:
        mx = tuple(_packed_u8_weights(header))[:3]
    if mx:
        return CheckpointKind("mxfp4", "packed MXFP4/FP4 weights (4-bit codes with block scales)", mx, False)
    iq = ex(lambda n: n.endswith((".qweight", ".absmax", ".qzeros")) or ".quant_state." in n)
    if iq:
        return CheckpointKind("int", "integer quantization (GPTQ/AWQ/bitsandbytes)", iq, False)
    fp8 = [e for e in _linear_weights(header) if e.dtype in _FP8]
    if fp8:
        dts = sorted({e.dtype for e in fp8})
        return CheckpointKind(
            "fp8", f"{len(fp8)} Linear weight(s) stored as {'/'.join(dts)}", tuple(e.name for e in fp8[:3])
        )
    dts = sorted({e.dtype for e in _linear_weights(header)})
    return CheckpointKind("plain", f"Linear weights in {'/'.join(dts) or 'no Linear weights'}")


def _packed_u8_weights(h: SafetensorsHeader) -> Iterator[str]:
    """uint8 `X.weight` [N, K/2] next to a uint8 scale [N, K/32]: MXFP4 codes + E8M0 scales."""
    for e in _linear_weights(h):
        if e.dtype != "U8":
            continue
        base = e.name[: -len(".weight")]
        for suffix in (".weight_scale", ".weight_scales", ".scales", ".weight_scale_inv"):
            s = h.tensors.get(base + suffix)
            if s is not None and s.dtype in ("U8", "F8_E8M0") and len(s.shape) == 2 and s.shape[1] \
                    and e.shape[1] == 16 * s.shape[1]:
                yield e.name
                break


def _comfy_quant_formats(meta: dict[str, str]) -> list[str]:
    text = meta.get("_quantization_metadata")
    if not text or len(text) > 10_000_000:
        return []
    try:
        layers = json.loads(text).get("layers", {})
        return sorted({str(v.get("format")) for v in layers.values() if isinstance(v, dict)})[:5]
    except (ValueError, AttributeError, RecursionError):
        return []


