"""Where a ComfyUI checkout is, for the benchmarks and the tests that drive a real ComfyUI.

Looked up, in order, through $COMFYUI_PATH, the custom_nodes layout (this repo sits in
ComfyUI/custom_nodes/<pack>), then comfy-cli's default ~/comfy/ComfyUI. Only paths are looked
at here; nothing of ComfyUI is imported (quant/ never imports it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def find_comfyui() -> tuple[Path | None, str]:
    """Return (path, how it was found) or (None, why not)."""
    tried = []
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser()
        if (p / "comfy" / "ops.py").is_file():
            return p, f"COMFYUI_PATH={p}"
        tried.append(f"COMFYUI_PATH={p} (no comfy/ops.py there)")
    if REPO_ROOT.parent.name == "custom_nodes":
        p = REPO_ROOT.parent.parent
        if (p / "comfy" / "ops.py").is_file():
            return p, f"custom_nodes layout ({p})"
        tried.append(f"custom_nodes layout ({p}: no comfy/ops.py)")
    p = Path("~/comfy/ComfyUI").expanduser()
    if (p / "comfy" / "ops.py").is_file():
        return p, f"comfy-cli default ({p})"
    tried.append(f"{p} (not found)")
    return None, "no ComfyUI found; tried " + ", ".join(tried)


def add_comfyui_to_path() -> Path:
    """Put the checkout on sys.path (once) and return it; a clear error when there is none."""
    path, how = find_comfyui()
    if path is None:
        raise ModuleNotFoundError(f"this needs a ComfyUI checkout: {how}")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path


__all__ = ["add_comfyui_to_path", "find_comfyui"]
