"""The ignored-layers text as users type it, and the one planning entry every caller uses.

- `None`, or a text whose first line starts with `# auto` (the loader node's default,
  AUTO_IGNORE_TEXT): the family's defaults (`quant.models.default_ignore_text`); patterns written
  below the `# auto` line are added to those defaults;
- `""` (an empty field): no pattern, quantize every eligible layer;
- anything else: exactly those patterns (syntax: patterns.py).

The loader node, the web preview route and the CLI all call `plan_from_text`, so one text gives
one plan wherever it is typed.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..models import default_ignore_text, detect_family
from .plan import LinearInfo, QuantPlan, build_plan

AUTO_MARKER = "# auto"
AUTO_IGNORE_TEXT = (
    "# auto: per-model defaults (write patterns below this line to add to them;"
    " clear the field to quantize everything eligible)\n"
)


def resolve_ignore_text(text: str | None, family: str, names: Sequence[str]) -> tuple[str | None, bool]:
    """(text to give build_plan, whether the family defaults are used). See the module docstring."""
    if text is None:
        return None, True
    stripped = text.strip()
    if stripped.lower().startswith(AUTO_MARKER):
        extra = "\n".join(stripped.splitlines()[1:]).strip()
        if not extra:
            return None, True
        return default_ignore_text(family, list(names)) + extra + "\n", True
    return text, False


def plan_from_text(
    layers: Sequence[LinearInfo],
    format: str,
    text: str | None,
    family: str,
    min_out_features: int = 256,
) -> tuple[QuantPlan, bool]:
    """The plan for a user's ignored-layers text (`# auto` resolved), and whether the family
    defaults were used. `family="auto"` detects it from the layer names."""
    if family == "auto":
        family = detect_family(f"{li.name}.weight" for li in layers)
    resolved, uses_defaults = resolve_ignore_text(text, family, [li.name for li in layers])
    return build_plan(list(layers), format, resolved, family, min_out_features), uses_defaults


__all__ = ["AUTO_IGNORE_TEXT", "AUTO_MARKER", "plan_from_text", "resolve_ignore_text"]
