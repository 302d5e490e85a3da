"""ComfyUI's model detector taught to take a small-width Z-Image for a Z-Image.

ComfyUI detects Z-Image (heads, RoPE axes, z_image modulation) only at width 3840. `detector`
wraps `comfy.model_detection.detect_unet_config` so that a Lumina2 NextDiT of another width that is
a multiple of 128 gets Z-Image's options (`config`: the NextDiT options of tests' Z-Image) with
heads of 128. Imports nothing of this repository (a test server's custom node imports it too);
tests in-process use `helpers_models.zimage_detection`.
"""

from __future__ import annotations

from collections.abc import Callable

KEEP = ("in_channels", "patch_size", "dim", "n_layers", "cap_feat_dim")  # read from the file itself


def detector(detect: Callable, config: dict) -> Callable:
    def detect_unet_config(state_dict, key_prefix, metadata=None):
        cfg = detect(state_dict, key_prefix, metadata=metadata)
        if cfg and cfg.get("image_model") == "lumina2" and "n_heads" not in cfg and cfg["dim"] % 128 == 0:
            cfg.update({k: v for k, v in config.items() if k not in KEEP})
            cfg["n_heads"] = cfg["n_kv_heads"] = cfg["dim"] // 128
        return cfg

    return detect_unet_config


def install_in_server(config: dict) -> None:
    """For a test server's custom node: the detector for good, and ComfyUI's ZImage model config
    (shift 3, Z-Image's text encoder) chosen by Z-Image's modulation instead of by width 3840."""
    import comfy.model_detection as md
    import comfy.supported_models as sm

    md.detect_unet_config = detector(md.detect_unet_config, config)
    sm.ZImage.unet_config = {"image_model": "lumina2", "z_image_modulation": True}
