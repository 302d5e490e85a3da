"""Node ids, display names, search words and the category, in one place (ids carry the pack prefix)."""

import json
from pathlib import Path

CATEGORY = "OnlineQuant"

LOADER = "OnlineQuantDiffusionLoader"
ATTENTION = "OnlineQuantAttention"
COMPARE = "OnlineQuantCompare"
SAVE_QUANTIZED = "OnlineQuantSaveQuantized"

DISPLAY_NAMES: dict[str, str] = {
    # The format names come early: frontends before search aliases (1.35.x) search only the id and
    # the display name, and their fuzzy match penalises words far from the start.
    LOADER: "Load Diffusion Model FP8/MXFP4 (Online Quant)",
    ATTENTION: "Attention Backend (Online Quant)",
    COMPARE: "Compare Models (Online Quant)",
    SAVE_QUANTIZED: "Save Quantized Model (Online Quant)",
}

# The words users type in the node search besides the display name (format and model names).
# One file for both sides: the schema sends them where ComfyUI knows `search_aliases`, and
# web/search_aliases.js adds them on the page where an older server leaves them out.
SEARCH_ALIASES: dict[str, list[str]] = json.loads(
    (Path(__file__).resolve().parent.parent / "web" / "search_aliases.json").read_text(encoding="utf-8")
)


def search_alias_kwargs(schema_cls: type, node_id: str) -> dict:
    """`search_aliases=` for io.Schema where this ComfyUI's Schema has the field (newer than 0.8)."""
    fields = getattr(schema_cls, "__dataclass_fields__", {})
    return {"search_aliases": list(SEARCH_ALIASES[node_id])} if "search_aliases" in fields else {}
