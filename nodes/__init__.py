"""ComfyUI glue: loader nodes, the attention node, server routes and quantized-tensor layouts.

Importing this package imports ComfyUI (`comfy_api`, `comfy`); the root `__init__.py` does it
lazily from `comfy_entrypoint`.
"""

from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from .names import CATEGORY, DISPLAY_NAMES

log = logging.getLogger(__name__)


def node_list() -> list[type[io.ComfyNode]]:
    from .attention_node import OnlineQuantAttention
    from .loader_node import OnlineQuantDiffusionLoader

    nodes: list[type[io.ComfyNode]] = [OnlineQuantDiffusionLoader, OnlineQuantAttention]
    try:  # engineer H's compare node, when it exists
        from .compare import OnlineQuantCompare
    except ImportError as e:
        if "compare" not in str(e):
            log.warning("OnlineQuant: compare node not loaded: %s", e)
    else:
        nodes.append(OnlineQuantCompare)
    return nodes


def _register_routes() -> None:
    """The web preview route (engineer F) registers on ComfyUI's server when it exists (idempotent)."""
    try:
        from . import routes
    except ImportError:
        return
    setup = getattr(routes, "setup", None)
    if setup is not None:
        try:
            setup()
        except Exception as e:  # the nodes must still load when the server is absent (tests, scripts)
            log.warning("OnlineQuant: web routes not registered: %s", e)


class OnlineQuantExtension(ComfyExtension):
    async def on_load(self) -> None:
        _register_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.8.0's loader calls get_node_list but never on_load: register here too.
        _register_routes()
        return node_list()


__all__ = ["OnlineQuantExtension", "CATEGORY", "DISPLAY_NAMES", "node_list"]
