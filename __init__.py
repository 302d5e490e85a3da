"""ComfyUI entry point of ComfyUI-OnlineQuant.

This is the only module that knows it runs inside ComfyUI: `quant/` is plain PyTorch and
`nodes/` is imported lazily here, so importing the pack never touches ComfyUI at import time.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """V3 entry point: ComfyUI calls this and registers the returned extension's nodes."""
    from .nodes import OnlineQuantExtension

    return OnlineQuantExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
