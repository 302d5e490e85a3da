"""Wan 2.1 / 2.2 (14B experts, 1.3B, 2.2 TI2V 5B): defaults, diffusers aliases, detection,
reference shapes.

Linear layers (weights [out, in]): ``blocks.N`` with ``self_attn.q/k/v/o`` and
``cross_attn.q/k/v/o`` dim x dim (I2V 2.1 adds ``k_img``/``v_img``), ``ffn.0`` dim->ffn and
``ffn.2`` back; outside the blocks ``text_embedding.0/2`` (4096->dim), ``time_embedding.0/2``,
``time_projection.1`` dim->6*dim, ``head.head`` dim->64 (5B: 192) and ``img_emb.proj.1/3`` (I2V).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .base import Family, IgnoreRule, ReferenceModel, register_family, seeded_randn, shape_of

# Attention projections: quantized weights, bf16 activations. The Wan 2.2 collapse on long videos
# reported with FP8 in attention and FFN (vLLM-Omni PR #2920) was online W8A8, i.e. per-token FP8
# *activations*; Comfy-Org's widely used Wan 2.2 `*_fp8_scaled` files hold every block Linear,
# attention included, as FP8 weights computed in bf16. So attention keeps bf16 activations and
# the FFN (the reported-stable part) quantizes its activations too. The earlier FFN-only setting
# is one edit away: add `self_attn` and `cross_attn` lines (the last matching line decides).
_WAN_ATTENTION = (
    IgnoreRule(
        "self_attn",
        "weights in the format, bf16 activations (W8A8 attention was the reported instability)",
        action="weights-only",
    ),
    IgnoreRule(
        "cross_attn", "weights in the format, bf16 activations, as the self-attention", action="weights-only"
    ),
)
_WAN_OUTSIDE = (
    IgnoreRule("text_embedding", "umT5 text projection (4096->dim): the prompt conditioning"),
    IgnoreRule("time_embedding", "timestep MLP: small, its error shifts every block's modulation"),
    IgnoreRule(
        "time_projection", "timestep -> 6 modulation vectors per block: gate errors scale the residual"
    ),
    IgnoreRule("head", "output projection (out 64/192): errors land directly in the prediction"),
)
_WAN_ALIASES = (
    # diffusers' names for the same layers
    ("self_attn.q", ("attn1.to_q",)),
    ("self_attn.k", ("attn1.to_k",)),
    ("self_attn.v", ("attn1.to_v",)),
    ("self_attn.o", ("attn1.to_out.0", "attn1.to_out")),
    ("cross_attn.q", ("attn2.to_q",)),
    ("cross_attn.k", ("attn2.to_k",)),
    ("cross_attn.v", ("attn2.to_v",)),
    ("cross_attn.o", ("attn2.to_out.0", "attn2.to_out")),
    ("cross_attn.k_img", ("attn2.add_k_proj",)),
    ("cross_attn.v_img", ("attn2.add_v_proj",)),
    ("ffn.0", ("ffn.net.0.proj",)),
    ("ffn.2", ("ffn.net.2",)),
)

WAN21 = Family(
    key="wan21",
    display_name="Wan 2.1 (T2V/I2V 14B, 1.3B) / Wan 2.2 A14B expert",
    ignore=_WAN_OUTSIDE
    + (IgnoreRule("img_emb", "CLIP image projection of I2V: the input-image conditioning", only="I2V"),)
    + _WAN_ATTENTION,
    aliases=_WAN_ALIASES,
    describe=lambda keys, shapes: describe(keys, shapes),
    notes=(
        "Wan 2.2 A14B experts have exactly the layer names and shapes of Wan 2.1 T2V 14B, so "
        "detection cannot tell them apart; 'wan22_14b' is an alias of this entry."
    ),
)

WAN22_5B = Family(
    key="wan22_5b",
    display_name="Wan 2.2 TI2V 5B",
    ignore=_WAN_OUTSIDE + _WAN_ATTENTION,
    aliases=_WAN_ALIASES,
    describe=lambda keys, shapes: describe(keys, shapes),
)


def detect(keys: set[str], shapes: Mapping[str, Sequence[int]] | None) -> str | None:
    """``head.modulation`` (or, from Linear layers only, ``head.head`` + ``time_projection.1``), as
    ComfyUI 0.8 detects. ``head.head`` with out 192 (out_dim 48 x patch 1x2x2) is Wan 2.2 TI2V 5B;
    otherwise "wan21" (T2V/I2V 14B, 1.3B, and Wan 2.2 A14B experts, which have identical names and
    shapes and cannot be told apart)."""
    if "head.modulation" not in keys and not {"head.head.weight", "time_projection.1.weight"} <= keys:
        return None
    s = shape_of(shapes, "head.head.weight")
    return "wan22_5b" if s is not None and s[0] == 192 else "wan21"


def describe(keys: set[str], shapes: Mapping[str, Sequence[int]] | None) -> str:
    blocks = {k.split(".")[1] for k in keys if k.startswith("blocks.") and k.count(".") > 1}
    s = shape_of(shapes, "head.head.weight")
    dim = f"dim {s[1]}, " if s else ""
    if detect(keys, shapes) == "wan22_5b":
        return f"Wan 2.2 TI2V 5B ({dim}{len(blocks)} blocks)"
    kind = "I2V" if any(k.startswith("img_emb.") for k in keys) else "T2V"
    return f"Wan 2.1 {kind} or Wan 2.2 A14B expert ({dim}{len(blocks)} blocks)"


def reference_linears(
    dim: int, ffn: int, blocks: int, head_out: int, i2v: bool
) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = [
        ("text_embedding.0", dim, 4096),
        ("text_embedding.2", dim, dim),
        ("time_embedding.0", dim, 256),
        ("time_embedding.2", dim, dim),
        ("time_projection.1", 6 * dim, dim),
    ]
    for b in range(blocks):
        p = f"blocks.{b}."
        for a in ("self_attn", "cross_attn"):
            out += [(f"{p}{a}.{x}", dim, dim) for x in ("q", "k", "v", "o")]
        if i2v:
            out += [(p + "cross_attn.k_img", dim, dim), (p + "cross_attn.v_img", dim, dim)]
        out += [(p + "ffn.0", ffn, dim), (p + "ffn.2", dim, ffn)]
    out.append(("head.head", head_out, dim))
    if i2v:
        out += [("img_emb.proj.1", 1280, 1280), ("img_emb.proj.3", dim, 1280)]
    return out


_DIFFUSERS = re.compile(r"^(condition_embedder\.|proj_out\.|blocks\.\d+\.(attn[12]\.to_|ffn\.net\.))")


def unloadable_layout(keys: set[str]) -> str | None:
    """Wan in diffusers' layout (``condition_embedder.*``, ``attn1.to_q``, ``ffn.net.0.proj``):
    ComfyUI 0.8 detects Wan only from its own names (``head.modulation``, ``self_attn.q``)."""
    hit = next((k for k in sorted(keys) if _DIFFUSERS.match(k)), None)
    if hit is None:
        return None
    return (
        f"a diffusers-format Wan transformer (e.g. {hit!r}); ComfyUI loads Wan only in its own "
        "layout: use Comfy-Org's repackaged files (Wan_2.2_ComfyUI_Repackaged: "
        "wan2.2_ti2v_5B_fp16.safetensors, wan2.2_t2v_high/low_noise_14B_fp16.safetensors; "
        "Wan_2.1_ComfyUI_repackaged for 2.1)"
    )


# ComfyUI's WanModel options (what its model detection sets for these files).
_WAN_COMMON = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, freq_dim=256, text_dim=4096)
WAN14B_CONFIG = dict(_WAN_COMMON, in_dim=16, dim=5120, ffn_dim=13824, out_dim=16, num_heads=40, num_layers=40)
WAN5B_CONFIG = dict(_WAN_COMMON, in_dim=48, dim=3072, ffn_dim=14336, out_dim=48, num_heads=24, num_layers=30)


def _example_inputs(channels: int, latent: tuple[int, int, int]):
    def example_inputs(quick: bool, device, dtype) -> dict:
        """One WanModel step on a [1, C, T, H, W] latent with 512 umT5 tokens."""
        import torch

        randn = seeded_randn(device, dtype)
        t, h, w = (1, 8, 8) if quick else latent
        return dict(
            x=randn(1, channels, t, h, w),
            timestep=torch.tensor([500.0], device=device),
            context=randn(1, 512 if not quick else 12, 4096, scale=0.5),
        )

    return example_inputs


def _reference(
    name: str,
    family: str,
    dim: int,
    ffn: int,
    blocks: int,
    head_out: int,
    i2v: bool,
    config: dict | None,
    description: str,
    latent: tuple[tuple[int, int, int], str] | None = None,
) -> ReferenceModel:
    def detected_tensors() -> dict[str, tuple[int, ...]]:
        return {
            "head.modulation": (1, 2, dim),
            "patch_embedding.weight": (dim, 48 if head_out == 192 else 16, 1, 2, 2),
            "blocks.0.norm3.weight": (dim,),
        }

    return ReferenceModel(
        name,
        family,
        lambda: reference_linears(dim, ffn, blocks, head_out, i2v),
        detected_tensors,
        "comfy.ldm.wan.model:WanModel" if config else "",
        config or {},
        description,
        tiny_overrides=dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2) if config else {},
        example_inputs=_example_inputs(config["in_dim"], latent[0]) if config and latent else None,
        inputs_description=latent[1] if latent else "",
    )


register_family(
    WAN21,
    aliases=("wan22_14b", "wan"),
    detect=detect,
    unloadable_layout=unloadable_layout,
    references=[
        _reference(
            "wan21_t2v_14b",
            "wan21",
            5120,
            13824,
            40,
            64,
            False,
            WAN14B_CONFIG,
            "Wan 2.1 T2V 14B / Wan 2.2 A14B expert",
            ((21, 60, 104), "832x480x81 (32760 tokens)"),
        ),
        _reference("wan21_i2v_14b", "wan21", 5120, 13824, 40, 64, True, None, "Wan 2.1 I2V 14B"),
        _reference("wan21_t2v_1.3b", "wan21", 1536, 8960, 30, 64, False, None, "Wan 2.1 T2V 1.3B"),
    ],
)
register_family(
    WAN22_5B,
    references=[
        _reference(
            "wan22_5b",
            "wan22_5b",
            3072,
            14336,
            30,
            192,
            False,
            WAN5B_CONFIG,
            "Wan 2.2 TI2V 5B",
            ((31, 44, 80), "1280x704x121 (27280 tokens)"),
        ),
    ],
)
