"""The V3 ComfyExtension that lists the pack's nodes (imports comfy_api: only ComfyUI needs it)."""

from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

log = logging.getLogger(__name__)


def node_list() -> list[type[io.ComfyNode]]:
    from .attention_node import OnlineQuantAttention
    from .loader_node import OnlineQuantDiffusionLoader

    nodes: list[type[io.ComfyNode]] = [OnlineQuantDiffusionLoader, OnlineQuantAttention]
    try:  # the compare node (nodes/compare.py), when it imports
        from .compare import OnlineQuantCompare
    except ImportError as e:
        if "compare" not in str(e):
            log.warning("OnlineQuant: compare node not loaded: %s", e)
    else:
        nodes.append(OnlineQuantCompare)
    return nodes


def register_routes() -> None:
    """The web preview route (nodes/routes.py) registers on ComfyUI's server when it exists (idempotent)."""
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
        register_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.8.0's custom-node loader calls get_node_list() but never on_load():
        # register here too, or the web preview has no route (tests/test_routes.py checks it).
        register_routes()
        return node_list()
