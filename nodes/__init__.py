"""ComfyUI glue: loader nodes, the attention node, server routes and quantized-tensor layouts.

`OnlineQuantExtension` (nodes/extension.py) is resolved lazily, so `nodes.loader`, `nodes.ops`
and `nodes.layouts` import with ComfyUI's model code alone (comfy, comfy_kitchen), without
comfy_api's server-side requirements (av, ...): scripts, benchmarks and the CLI use them so.
"""

from __future__ import annotations

from .names import CATEGORY, DISPLAY_NAMES


def __getattr__(name: str):
    if name in ("OnlineQuantExtension", "node_list"):
        from . import extension

        return getattr(extension, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["OnlineQuantExtension", "CATEGORY", "DISPLAY_NAMES", "node_list"]
