"""Shared fixtures: find a real ComfyUI, import the pack the way ComfyUI does.

ComfyUI is looked up, in order, through $COMFYUI_PATH, the custom_nodes layout (this repo sits
in ComfyUI/custom_nodes/<pack>), then comfy-cli's default ~/comfy/ComfyUI. Tests that need it
skip with the reason when none is found.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_MODULE = "comfyui_online_quant"

# unit/ needs no ComfyUI, comfy/ imports a real one, e2e/ drives a real server (and Chromium);
# support/ holds the helpers they share, scripts/ the generators and measurement scripts.
for _sub in ("support", "scripts"):
    if str(Path(__file__).parent / _sub) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parent / _sub))

from quant.bench.comfyui_checkout import find_comfyui  # noqa: E402  (one lookup for tests and benchmarks)

_COMFY_PATH, _COMFY_HOW = find_comfyui()


def _import_comfy_or_skip():
    if _COMFY_PATH is None:
        pytest.skip(_COMFY_HOW)
    if str(_COMFY_PATH) not in sys.path:
        sys.path.insert(0, str(_COMFY_PATH))
    try:
        import comfy.cli_args

        # No GPU in CI: ComfyUI must not probe CUDA. Same effect as `main.py --cpu`.
        import torch

        if not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401
        import comfy.ops  # noqa: F401
    except ImportError as e:  # ComfyUI present but its requirements are not installed
        pytest.skip(f"ComfyUI at {_COMFY_PATH} does not import ({e}); install its requirements")
    return _COMFY_PATH


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    """Path of a real ComfyUI checkout, importable as `comfy` (skips when none is found)."""
    return _import_comfy_or_skip()


class _QuantAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`comfyui_online_quant.quant.X` is the very module `quant.X` that the unit tests import, so
    one process holds one copy of the library: one format registry, one backend registry, one
    definition of each torch.library op (ComfyUI itself imports the pack once, by file location)."""

    prefix = f"{PACK_MODULE}.quant"

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.prefix or fullname.startswith(self.prefix + "."):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module("quant" + spec.name[len(self.prefix) :])
        self._spec = module.__spec__  # importlib sets __spec__ on what we return: put it back after
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._spec


def import_pack():
    """Import this repo as a package, as ComfyUI's custom-node loader does (by file location)."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    if not any(isinstance(f, _QuantAlias) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuantAlias())
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack(comfyui_path):
    """The pack imported as ComfyUI imports it (needs ComfyUI for `pack.nodes`)."""
    return import_pack()


@pytest.fixture(scope="session")
def comfy_server(comfyui_path, tmp_path_factory):
    """A real ComfyUI server (main.py --cpu, loopback) with this pack as a custom node.

    Isolated base directory (models, custom_nodes, user, db) under a temp dir; models go in
    `comfy_server.models_dir / "diffusion_models"` etc. (ComfyUI rescans folders when they change).
    Stopped by PID at the end of the session. See tests/support/comfy_server.py.
    """
    from comfy_server import start_comfy_server

    if importlib.util.find_spec("comfyui_frontend_package") is None:
        # ComfyUI's main.py exits at start without it (the frontend ships as that pip package)
        pytest.skip(
            "ComfyUI's requirements are not installed here (comfyui-frontend-package): "
            f"pip install -r {comfyui_path}/requirements.txt"
        )
    base = tmp_path_factory.mktemp("comfy_base")
    try:
        server = start_comfy_server(comfyui_path, base)
    except RuntimeError as e:
        pytest.fail(f"could not start ComfyUI: {e}")
    yield server
    server.stop()

