"""Z-Image (Lumina2's NextDiT at width 3840): defaults, fused q/k/v, detection, reference shapes.

Linear layers (weights [out, in]): ``layers.0-29``, ``noise_refiner.0-1`` and
``context_refiner.0-1`` (no adaLN), each with ``attention.qkv`` 3840->11520 (fused q, k, v),
``attention.out``, ``feed_forward.w1/w3`` 3840->10240, ``w2`` back, ``adaLN_modulation.0``
256->15360; outside the blocks ``x_embedder`` 64->3840, ``cap_embedder.1`` 2560->3840,
``t_embedder.mlp.0/2``, ``final_layer.linear`` 3840->64 and ``final_layer.adaLN_modulation.1``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .base import Family, FusedLayer, IgnoreRule, ReferenceModel, register_family, seeded_randn, shape_of

# Reported for Z-Image-Turbo: FP8 on every Linear gave noise (LPIPS 0.74); keeping the
# sensitive layers below in bf16 gave 0.07. They are also a small share of the weights (about 2%).
FAMILY = Family(
    key="zimage",
    display_name="Z-Image (Lumina2 NextDiT, dim 3840)",
    ignore=(
        IgnoreRule("x_embedder", "patch embedding (64->3840): first layer, its error reaches every token"),
        IgnoreRule("cap_embedder", "caption/text projection (2560->3840): the prompt conditioning"),
        IgnoreRule("t_embedder", "timestep MLP: tiny, its error shifts every block's modulation"),
        IgnoreRule(
            "adaLN_modulation",
            "per-block scale/gate (256->15360): 2% of weights, gate errors scale the residual stream",
        ),
        IgnoreRule(
            "final_layer", "output projection (out 64) + its modulation: errors land in the prediction"
        ),
    ),
    fused=(
        FusedLayer(
            "attention.qkv",
            (
                ("attention.q", "attention.to_q"),
                ("attention.k", "attention.to_k"),
                ("attention.v", "attention.to_v"),
            ),
            "Z-Image (ComfyUI's NextDiT) computes q, k and v in one fused Linear 'attention.qkv'",
        ),
    ),
    describe=lambda keys, shapes: describe(keys, shapes),
    aliases=(
        ("attention.qkv", ("attention.to_qkv",)),
        ("attention.out", ("attention.to_out.0", "attention.to_out", "attention.o")),
        # sglang fuses w1 and w3 into 'w13'; ComfyUI keeps them apart: 'w13' selects both.
        ("feed_forward.w1", ("feed_forward.w13",)),
        ("feed_forward.w3", ("feed_forward.w13",)),
    ),
)


def detect(keys: set[str], shapes: Mapping[str, Sequence[int]] | None) -> str | None:
    """``cap_embedder.1.weight`` with dim (its out_features) 3840, as ComfyUI 0.8 detects. Other
    widths are Lumina2 models that ComfyUI does not treat as Z-Image: "generic"."""
    if "cap_embedder.1.weight" not in keys:
        return None
    s = shape_of(shapes, "cap_embedder.1.weight")
    return "zimage" if s is None or s[0] == 3840 else "generic"


def describe(keys: set[str], shapes: Mapping[str, Sequence[int]] | None) -> str:
    layers = {k.split(".")[1] for k in keys if k.startswith("layers.") and k.count(".") > 1}
    return f"Z-Image ({len(layers)} layers)"


def reference_linears() -> list[tuple[str, int, int]]:
    d, ffn = 3840, 10240
    out: list[tuple[str, int, int]] = [("x_embedder", d, 64)]

    def block(p: str, modulation: bool) -> None:
        out.extend(
            [
                (p + "attention.qkv", 3 * d, d),
                (p + "attention.out", d, d),
                (p + "feed_forward.w1", ffn, d),
                (p + "feed_forward.w2", d, ffn),
                (p + "feed_forward.w3", ffn, d),
            ]
        )
        if modulation:
            out.append((p + "adaLN_modulation.0", 4 * d, 256))

    for i in range(2):
        block(f"noise_refiner.{i}.", True)
    for i in range(2):
        block(f"context_refiner.{i}.", False)
    out += [("t_embedder.mlp.0", 1024, 256), ("t_embedder.mlp.2", 256, 1024), ("cap_embedder.1", d, 2560)]
    for i in range(30):
        block(f"layers.{i}.", True)
    out += [("final_layer.linear", 64, d), ("final_layer.adaLN_modulation.1", d, 256)]
    return out


_DIFFUSERS = re.compile(
    r"^(all_x_embedder\.|all_final_layer\.|(layers|noise_refiner|context_refiner)\.\d+\.attention\.to_[qkv]\.)"
)


def unloadable_layout(keys: set[str]) -> str | None:
    """Z-Image in diffusers' layout (``all_x_embedder.2-1``, ``attention.to_q/to_k/to_v``): ComfyUI 0.8
    detects Z-Image only from its own names (``x_embedder``, fused ``attention.qkv``)."""
    hit = next((k for k in sorted(keys) if _DIFFUSERS.match(k)), None)
    if hit is None:
        return None
    return (
        f"a diffusers-format Z-Image transformer (e.g. {hit!r}); ComfyUI loads Z-Image only in its "
        "own layout: use Comfy-Org's repackaged z_image_turbo_bf16.safetensors "
        "(z_image_turbo, split_files/diffusion_models)"
    )


def _detected_tensors() -> dict[str, tuple[int, ...]]:
    return {"cap_embedder.0.weight": (2560,), "x_pad_token": (1, 3840)}


# ComfyUI's NextDiT options for Z-Image-Turbo (what its model detection sets at width 3840).
COMFY_CONFIG = dict(
    patch_size=2,
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    multiple_of=256,
    ffn_dim_multiplier=8.0 / 3.0,
    qk_norm=True,
    cap_feat_dim=2560,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
    rope_theta=256.0,
    z_image_modulation=True,
    time_scale=1000.0,
    pad_tokens_multiple=32,
)

def example_inputs(quick: bool, device, dtype) -> dict:
    """One NextDiT step at 1024x1024 (a 128x128 latent: 4096 image tokens) with 256 caption tokens."""
    import torch

    randn = seeded_randn(device, dtype)
    hw, txt, cap = (8, 32, 256) if quick else (128, 256, 2560)
    return dict(
        x=randn(1, 16, hw, hw),
        timesteps=torch.tensor([0.5], device=device),
        context=randn(1, txt, cap, scale=0.5),
        num_tokens=txt,
    )


register_family(
    FAMILY,
    aliases=("z-image",),
    detect=detect,
    unloadable_layout=unloadable_layout,
    references=[
        ReferenceModel(
            "zimage",
            "zimage",
            reference_linears,
            _detected_tensors,
            "comfy.ldm.lumina.model:NextDiT",
            COMFY_CONFIG,
            "Z-Image-Turbo 6B",
            tiny_overrides=dict(dim=256, n_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=256),
            example_inputs=example_inputs,
            inputs_description="1024x1024 (4096 image + 256 text tokens)",
        ),
    ],
)
