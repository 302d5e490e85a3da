"""The one planning entry for a checkpoint: from its tensor shapes (and what the file holds) and the
text the user typed, to the plan with every note, warning and refusal.

The loader node, the web preview and the CLI all call `plan_checkpoint` and differ only in how
they show the result, so a file is either planned the same way by all three or refused by all
three with the same message (what the file is, and what to use instead):
- already quantized: loaded as it is when ComfyUI reads its format (a note), else refused;
- saved by this pack's "Save Quantized Model" (`packed`): the plan saved in the file, its packed
  layers loaded as they are; the loader's format and ignored layers do not apply (a warning when
  they ask for something else);
- a layout ComfyUI does not load (diffusers names, a bare ``diffusion_model.`` prefix): refused;
- a forced family whose default patterns match none of the file's layers: a warning;
- ``quantization`` "none": every Linear kept, as a plain load does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..checkpoint import CheckpointKind, PackedFileInfo, classify_checkpoint, read_header, read_packed_info
from ..checkpoint.packed_file import logical_shapes
from ..errors import CheckpointError
from ..formats import get_format
from ..models import default_rules, describe_model, detect_family, get_family, unloadable_layout
from .layers import linears_from_shapes
from .plan import LayerDecision, QuantPlan, keep_all_plan
from .user_text import plan_from_text

NO_QUANTIZATION = "none"
# The largest diffusion transformers have a few thousand tensors (Wan 2.1 14B: about 1,100); a
# file with more is not one, and planning or loading it would take minutes and gigabytes first.
MAX_TENSORS = 50_000


@dataclass
class CheckpointPlan:
    """What loading a file with these settings will do."""

    family: str  # the family whose rules apply (forced or detected)
    detected: str  # what detection found
    description: str  # e.g. "Wan 2.2 TI2V 5B (dim 3072, 30 blocks)"
    plan: QuantPlan  # every Linear decided; all kept when nothing is quantized
    quantize: bool  # False: plain load ("none", or a file that is already quantized)
    uses_defaults: bool
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the plan's own warnings included


def plan_checkpoint(
    shapes: Mapping[str, Sequence[int]],
    format: str,
    ignore_text: str | None,
    *,
    family: str = "auto",
    min_out_features: int = 256,
    kind: CheckpointKind | None = None,
    file: str = "the file",
    packed: PackedFileInfo | None = None,
) -> CheckpointPlan:
    """Plan `file` (its header's `{tensor name: shape}`; `kind` from `classify_checkpoint` when the
    header is known; `packed` from `read_packed_info` for a file of "Save Quantized Model").
    Raises CheckpointError (naming `file`) for a file ComfyUI will not load, PatternError for a
    bad pattern (naming the user's line), ValueError for an unknown format."""
    if packed is not None:
        return _packed_plan(packed, shapes, format, ignore_text)
    names = list(shapes)
    if len(names) > MAX_TENSORS:
        why = (
            f"{len(names)} tensors; a diffusion transformer has a few thousand at most (this "
            f"loader takes up to {MAX_TENSORS}): not a diffusion model file, or a damaged one"
        )
        raise CheckpointError(f"{file}: {why}", path=file, reason=why)
    for n in names:
        if n.endswith(".bias") and n[: -len("bias")] + "weight" not in shapes:
            short = n if len(n) <= 200 else n[:100] + "..." + n[-20:]
            why = (
                f"tensor {short!r} is a bias without its weight (no '.weight' tensor of that layer): "
                "the file is incomplete or damaged; get it again"
            )
            raise CheckpointError(f"{file}: {why}", path=file, reason=why)
    if kind is not None and kind.prequantized and not kind.comfyui_loads:
        why = (
            f"already quantized ({kind.detail}; e.g. {', '.join(kind.examples)}); "
            "ComfyUI cannot load it: use the bf16/fp16 file of this model"
        )
        raise CheckpointError(f"{file}: {why}", path=file, reason=why)
    problem = unloadable_layout(names)
    if problem is not None:
        raise CheckpointError(f"{file}: {problem}", path=file, reason=problem)
    layers = linears_from_shapes(shapes)
    if not layers:
        why = "no Linear weights (2-D '.weight' tensors): not a diffusion transformer file"
        raise CheckpointError(f"{file}: {why}", path=file, reason=why)
    detected = detect_family(names, shapes)
    fam = detected if family in ("auto", "", None) else get_family(family).key
    notes: list[str] = []
    if fam != detected:
        notes.append(f"family set to {fam!r} (detected {detected!r})")
    if fam == "generic":
        notes.append("no tuned defaults for this model: generic rules (size threshold, format limits) apply")
    prequantized = kind is not None and kind.prequantized
    if format == NO_QUANTIZATION or prequantized:
        if prequantized and format != NO_QUANTIZATION:
            notes.append(
                f"the file is already quantized ({kind.detail}): loaded as it is, no online quantization"
            )
        reason = "quantization none" if format == NO_QUANTIZATION else "already quantized in the file"
        plan = keep_all_plan(layers, fam, reason, NO_QUANTIZATION)
        return CheckpointPlan(fam, detected, describe_model(names, shapes), plan, False, False, notes)
    plan, uses_defaults = plan_from_text(layers, format, ignore_text, fam, min_out_features)
    warnings = list(plan.warnings)
    if uses_defaults and fam != detected and not default_rules(fam, [li.name for li in layers]):
        warnings.append(
            f"none of the {fam!r} default patterns matches a layer of this file (detected {detected!r}): "
            "check the family, or write the patterns to keep"
        )
    return CheckpointPlan(
        fam, detected, describe_model(names, shapes), plan, True, uses_defaults, notes, warnings
    )


def _packed_plan(
    packed: PackedFileInfo, shapes: Mapping[str, Sequence[int]], format: str, ignore_text: str | None
) -> CheckpointPlan:
    """The plan a packed file was saved with: its packed layers loaded as they are (never quantized
    again), its other Linear layers kept. A request for another format, or for none, does not
    change what is loaded (the file holds no high-precision copy to quantize): it is loaded as
    saved, with a warning that says so and where the bf16 file is."""
    logical = logical_shapes(packed, shapes)
    names = list(logical)
    detected = detect_family(names, logical)
    decisions = []
    for li in linears_from_shapes(logical):
        p = packed.layers.get(li.name)
        why = (
            f"pre-quantized in the file ({p.format}, compute {p.compute})" if p else "kept when it was saved"
        )
        decisions.append(LayerDecision(li.name, li.out_features, li.in_features, p is not None, why, "file"))
    fam = packed.family if packed.family else detected
    plan = QuantPlan(packed.format, fam, decisions, ignore_text=ignore_text or "")
    notes = [
        f"loaded pre-quantized ({packed.describe()}) — no quantization; its plan "
        f"(sha256 {packed.plan_hash[:12]}) was fixed when it was saved, so ignored_layers, "
        "min_out_features and keep_sensitive do not apply"
    ]
    warnings = []
    source = f" ({packed.source})" if packed.source else ""
    if format == NO_QUANTIZATION:
        warnings.append(
            f"quantization 'none' asked for, but this file holds {packed.format} weights and no "
            f"bf16 copy: loaded as saved ({packed.format}); load the bf16 source file{source} for "
            "an unquantized model"
        )
    elif get_format(format).name not in packed.format.split(","):
        warnings.append(
            f"quantization {format!r} asked for, but this file was saved as {packed.format}: loaded as "
            f"saved ({packed.format}), not converted; to get {format}, load the bf16 source "
            f"file{source} with this loader"
        )
    return CheckpointPlan(fam, detected, describe_model(names, logical), plan, True, False, notes, warnings)


def plan_file(
    path: str, format: str, ignore_text: str | None, *, min_out_features: int = 256, file: str | None = None
) -> CheckpointPlan:
    """`plan_checkpoint` for a safetensors file on disk, from its header alone (`file`: the name
    messages give it, default the path)."""
    header = read_header(path)
    return plan_checkpoint(
        header.shapes(),
        format,
        ignore_text,
        min_out_features=min_out_features,
        kind=classify_checkpoint(header),
        file=file or path,
        packed=read_packed_info(header),
    )


__all__ = ["NO_QUANTIZATION", "CheckpointPlan", "plan_checkpoint", "plan_file"]
