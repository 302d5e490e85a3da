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

from ..models import detect_family
from .layers import LinearInfo
from .plan import QuantPlan, build_plan

AUTO_MARKER = "# auto"
# Short enough for one line of the node's text box (any first line starting "# auto" works; the
# tooltip says the rest: clear the field to quantize everything eligible).
AUTO_IGNORE_TEXT = "# auto: this model's defaults; add patterns below\n"


def uses_defaults(text: str | None) -> bool:
    """Whether the family's defaults apply: no text, or a first line starting with ``# auto``."""
    return text is None or text.strip().lower().startswith(AUTO_MARKER)


def plan_from_text(
    layers: Sequence[LinearInfo],
    format: str,
    text: str | None,
    family: str,
    min_out_features: int = 256,
) -> tuple[QuantPlan, bool]:
    """The plan for a user's ignored-layers text (`# auto` resolved), and whether the family
    defaults were used. `family="auto"` detects it from the layer names. The user's text is
    parsed as typed (the `# auto` line is a comment), so every message names its own lines."""
    if family == "auto":
        family = detect_family(f"{li.name}.weight" for li in layers)
    defaults = uses_defaults(text)
    auto_only = text is not None and defaults and not any(
        line.split("#", 1)[0].strip() for line in text.splitlines()
    )
    plan = build_plan(
        list(layers),
        format,
        None if text is None or auto_only else text,
        family,
        min_out_features,
        with_defaults=defaults and not auto_only and text is not None,
    )
    return plan, defaults


__all__ = ["AUTO_IGNORE_TEXT", "AUTO_MARKER", "plan_from_text", "uses_defaults"]
