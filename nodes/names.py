"""Node ids, display names and the category, in one place (ids carry the pack prefix)."""

CATEGORY = "OnlineQuant"

LOADER = "OnlineQuantDiffusionLoader"
ATTENTION = "OnlineQuantAttention"
COMPARE = "OnlineQuantCompare"

DISPLAY_NAMES: dict[str, str] = {
    LOADER: "Load Diffusion Model (Online Quant)",
    ATTENTION: "Attention Backend (Online Quant)",
    COMPARE: "Compare Models (Online Quant)",
}
