"""Tiny Z-Image and Wan models built from ComfyUI's own classes, with random weights, saved as
safetensors with the real key names (no model weights can be downloaded). Shared by tests.

Z-Image: ComfyUI detects Z-Image (heads, RoPE axes, z_image modulation) only when dim is 3840.
A tiny one is a Lumina2 `NextDiT` with Z-Image's options at a small width; `zimage_detection`
is a context manager that teaches ComfyUI's detector those options for the tiny width, so the
tiny file loads through the real `load_diffusion_model_state_dict` path.
Wan: detected at any dim that is a multiple of 128 (heads = dim/128), text_embedding.0 in 4096.

Call these only after the `comfyui_path` fixture made `comfy` importable.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

# The model configs and the random init live in quant/bench/models.py (one source for the real
# models' options). Standalone scripts (gpu_nodes_check.py, bench_compare_fullsize.py) put only
# tests/ on sys.path, so the repository root is added here for them.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from quant.bench.models import WAN14B, ZIMAGE, tiny_config  # noqa: E402
from quant.bench.models import init_random_ as _init_random_  # noqa: E402, F401  (used by scripts)

WAN_DIM = 256  # 2 heads of 128
WAN_FFN = 512
WAN_LAYERS = 2
ZIMAGE_DIM = 256  # 2 heads of 128; RoPE axes 32+48+48 = 128 as in Z-Image
ZIMAGE_CAP = 256
ZIMAGE_LAYERS = 2

WAN_CONFIG = tiny_config(
    WAN14B, dim=WAN_DIM, ffn_dim=WAN_FFN, num_heads=WAN_DIM // 128, num_layers=WAN_LAYERS
)
ZIMAGE_CONFIG = tiny_config(
    ZIMAGE,
    dim=ZIMAGE_DIM,
    n_layers=ZIMAGE_LAYERS,
    n_heads=ZIMAGE_DIM // 128,
    n_kv_heads=ZIMAGE_DIM // 128,
    cap_feat_dim=ZIMAGE_CAP,
)


def wan_model(seed: int = 0, out_dim: int = 16) -> torch.nn.Module:
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    m = WanModel(
        **tiny_config(WAN_CONFIG, out_dim=out_dim),
        operations=comfy.ops.disable_weight_init,
        dtype=torch.float32,
    )
    _init_random_(m, seed)
    return m.eval()


def zimage_model(seed: int = 0) -> torch.nn.Module:
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT

    m = NextDiT(**ZIMAGE_CONFIG, operations=comfy.ops.disable_weight_init, dtype=torch.float32)
    _init_random_(m, seed)
    return m.eval()


def save_model(module: torch.nn.Module, path: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save a module's state dict as a diffusion_models file (bare key names, as Comfy-Org ships)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(sd, str(path))
    return Path(path)


@contextlib.contextmanager
def zimage_detection():
    """Let ComfyUI's detector configure a small-width Z-Image like the real one (dim 3840)."""
    import comfy.model_detection as md
    from zimage_detect import detector

    orig = md.detect_unet_config
    md.detect_unet_config = detector(orig, ZIMAGE_CONFIG)
    try:
        yield
    finally:
        md.detect_unet_config = orig


def wan_inputs(seed: int = 1, dtype: torch.dtype = torch.bfloat16) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(1, 16, 1, 8, 8, generator=g).to(dtype),
        "timestep": torch.tensor([500.0]),
        "context": (torch.randn(1, 12, 4096, generator=g) * 0.5).to(dtype),
    }


def zimage_inputs(seed: int = 1, dtype: torch.dtype = torch.bfloat16) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(1, 16, 8, 8, generator=g).to(dtype),
        "timesteps": torch.tensor([0.5]),
        "context": (torch.randn(1, 32, ZIMAGE_CAP, generator=g) * 0.5).to(dtype),
        "num_tokens": 32,
    }


def run_diffusion_model(patcher, inputs: dict) -> torch.Tensor:
    """Load the patcher the way sampling does (patches applied) and run its diffusion model once,
    passing the model's transformer_options (so attention overrides take effect)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    topts = patcher.model_options.get("transformer_options", {})
    dev = patcher.load_device
    inputs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    with torch.no_grad():
        return patcher.model.diffusion_model(**inputs, transformer_options=dict(topts)).float().cpu()


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.float().cpu(), out.float().cpu()  # either may sit on a GPU
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def import_submodules(pack, *names: str):
    """Import the pack's submodules (e.g. "nodes.loader") so `pack.nodes.loader` works."""
    import importlib

    for n in names or ("nodes.loader", "nodes.layouts", "nodes.ops", "nodes.attention", "quant.errors"):
        importlib.import_module(f"{pack.__name__}.{n}")
    return pack


def spy_online_linears(pack):
    """Record a weak reference to every OnlineQuantLinear built from now on (a failed load must
    leave none alive). -> (the list of weakrefs, a function that removes the spy)."""
    import weakref

    created = []
    cls = pack.nodes.ops.OnlineQuantLinear
    orig = cls.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        created.append(weakref.ref(self))

    cls.__init__ = spy
    return created, lambda: setattr(cls, "__init__", orig)
