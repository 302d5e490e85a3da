"""The V3 ComfyExtension that lists the pack's nodes (imports comfy_api: only ComfyUI needs it)."""

from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from . import reuse, routes
from .attention_node import OnlineQuantAttention
from .compare import OnlineQuantCompare
from .loader_node import OnlineQuantDiffusionLoader
from .save_quantized import OnlineQuantSaveQuantized

log = logging.getLogger(__name__)


def node_list() -> list[type[io.ComfyNode]]:
    return [OnlineQuantDiffusionLoader, OnlineQuantAttention, OnlineQuantCompare, OnlineQuantSaveQuantized]


def register_routes() -> None:
    """The web preview route and the plan-reuse hook register on ComfyUI's server when one runs
    (idempotent)."""
    try:
        routes.setup()
        reuse.setup()
    except Exception as e:  # the nodes must still load when the server is absent (tests, scripts)
        log.warning("OnlineQuant: web routes not registered: %s", e)


class OnlineQuantExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.8.0's custom-node loader calls get_node_list() but never on_load():
        # register here too, or the web preview has no route (tests/comfy/test_routes.py checks it).
        register_routes()
        return node_list()
