"""The one planning entry for a checkpoint: from its tensor shapes (and what the file holds) and the
text the user typed, to the plan with every note, warning and refusal.

The loader node, the web preview and the CLI all call `plan_checkpoint` and differ only in how
they show the result, so a file is either planned the same way by all three or refused by all
three with the same message (what the file is, and what to use instead):
- already quantized: loaded as it is when ComfyUI reads its format (a note), else refused;
- a layout ComfyUI does not load (diffusers names, a bare ``diffusion_model.`` prefix): refused;
- a forced family whose default patterns match none of the file's layers: a warning;
- ``quantization`` "none": every Linear kept, as a plain load does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..checkpoint import CheckpointKind, classify_checkpoint, read_header
from ..errors import CheckpointError
from ..models import default_rules, describe_model, detect_family, get_family, unloadable_layout
from .layers import linears_from_shapes
from .plan import QuantPlan, keep_all_plan
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
) -> CheckpointPlan:
    """Plan `file` (its header's `{tensor name: shape}`; `kind` from `classify_checkpoint` when the
    header is known). Raises CheckpointError (naming `file`) for a file ComfyUI will not load,
    PatternError for a bad pattern (naming the user's line), ValueError for an unknown format."""
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
    )


__all__ = ["NO_QUANTIZATION", "CheckpointPlan", "plan_checkpoint", "plan_file"]
