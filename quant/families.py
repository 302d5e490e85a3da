"""Per-model-family data: display names, default ignore lists (with the reason for each line),
fused-layer and alias maps, and detection from a checkpoint's tensor names.

Everything here is a table; the logic that applies it lives in quant/selection.py.
Layer names are ComfyUI's (without the ``diffusion_model.`` prefix), see DESIGN.md §3.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import PatternError
from .patterns import PatternSet, parse_patterns, strip_prefix

__all__ = [
    "IgnoreRule",
    "FusedLayer",
    "Family",
    "FAMILIES",
    "FAMILY_ALIASES",
    "get_family",
    "family_choices",
    "default_ignore_text",
    "detect_family",
    "describe_model",
]


@dataclass(frozen=True)
class IgnoreRule:
    pattern: str
    reason: str
    only: str = ""  # the variants that have the layer ("I2V"); empty = every variant


@dataclass(frozen=True)
class FusedLayer:
    """One Linear that computes several logical projections (e.g. Z-Image's q, k, v).

    ``name`` is the layer's own suffix; each part lists the names that denote it (the first is
    the canonical one, the others are aliases from other implementations such as diffusers).
    """

    name: str
    parts: tuple[tuple[str, ...], ...]
    why: str


@dataclass(frozen=True)
class Family:
    key: str
    display_name: str
    ignore: tuple[IgnoreRule, ...]
    fused: tuple[FusedLayer, ...] = ()
    # (real layer suffix, other names that denote it or a fused group it belongs to). A pattern
    # that matches an alias selects the real layer: sglang's fused ``w13`` selects ComfyUI's w1
    # and w3; diffusers' ``attn1.to_q`` selects ComfyUI's ``self_attn.q``.
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()
    notes: str = ""


# DESIGN.md §7: FP8 on every Linear of Z-Image gave noise (LPIPS 0.74); keeping the sensitive
# layers below in bf16 gave 0.07. They are also a small share of the weights (about 2%).
_ZIMAGE = Family(
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
    aliases=(
        ("attention.qkv", ("attention.to_qkv",)),
        ("attention.out", ("attention.to_out.0", "attention.to_out", "attention.o")),
        # sglang fuses w1 and w3 into 'w13'; ComfyUI keeps them apart: 'w13' selects both.
        ("feed_forward.w1", ("feed_forward.w13",)),
        ("feed_forward.w3", ("feed_forward.w13",)),
    ),
)

# DESIGN.md §7: Wan 2.2 with FP8 in attention + FFN collapsed on long videos while FFN-only
# stayed stable, so the default keeps both attentions in bf16 (the only setting known stable).
# Removing the two attention lines quantizes ~8.4 B more weights of a 14B (more memory saved).
_WAN_ATTENTION = (
    IgnoreRule("self_attn", "attention kept bf16: Wan 2.2 with FP8 attention+FFN collapsed on long videos"),
    IgnoreRule("cross_attn", "attention kept bf16: FFN-only quantization stayed stable (DESIGN §7)"),
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

_WAN21 = Family(
    key="wan21",
    display_name="Wan 2.1 (T2V/I2V 14B, 1.3B) / Wan 2.2 A14B expert",
    ignore=_WAN_OUTSIDE
    + (IgnoreRule("img_emb", "CLIP image projection of I2V: the input-image conditioning", only="I2V"),)
    + _WAN_ATTENTION,
    aliases=_WAN_ALIASES,
    notes=(
        "Wan 2.2 A14B experts have exactly the layer names and shapes of Wan 2.1 T2V 14B, so "
        "detection cannot tell them apart; 'wan22_14b' is an alias of this entry."
    ),
)

_WAN22_5B = Family(
    key="wan22_5b",
    display_name="Wan 2.2 TI2V 5B",
    ignore=_WAN_OUTSIDE + _WAN_ATTENTION,
    aliases=_WAN_ALIASES,
)

_GENERIC = Family(
    key="generic",
    display_name="generic transformer",
    ignore=(
        IgnoreRule("re:embed", "input, timestep and text embedders (any name containing 'embed')"),
        IgnoreRule("re:adaLN|modulation", "modulation projections: their errors scale the residual stream"),
        IgnoreRule(
            r"re:(^|\.)(final_layer|proj_out|norm_out|head)(\.|$)",
            "output projection: errors land directly in the prediction",
        ),
    ),
)

FAMILIES: dict[str, Family] = {f.key: f for f in (_ZIMAGE, _WAN21, _WAN22_5B, _GENERIC)}
FAMILY_ALIASES: dict[str, str] = {"wan22_14b": "wan21", "wan": "wan21", "z-image": "zimage"}


def family_choices() -> list[str]:
    """Keys a user may pass as family (``auto`` is handled by the callers)."""
    return sorted([*FAMILIES, *FAMILY_ALIASES])


def get_family(key: str) -> Family:
    """Family by key or alias; unknown -> PatternError listing the known keys."""
    k = FAMILY_ALIASES.get(key, key)
    try:
        return FAMILIES[k]
    except KeyError:
        raise PatternError(f"unknown model family {key!r}; known: {', '.join(family_choices())}") from None


def default_ignore_text(family: str, names: Iterable[str] | None = None) -> str:
    """The default ignore text the loader node shows: one pattern per line with ``# reason``.

    With ``names`` (the model's Linear layer names), lines that match none of them (e.g. I2V-only
    layers on a T2V model) are left out, so the defaults never produce "matched nothing" warnings.
    """
    fam = get_family(family)
    rules = list(fam.ignore)
    if names is not None:
        names = [strip_prefix(n) for n in names]
        ps = PatternSet(parse_patterns("\n".join(r.pattern for r in rules)))
        hit: set[int] = set()
        for n in names:
            hit.update(ps.match(n))
        rules = [r for i, r in enumerate(rules) if i in hit]
    width = max((len(r.pattern) for r in rules), default=0)
    lines = [f"# {fam.display_name}: layers kept in bf16 (one pattern per line, '#' starts a comment)"]
    for r in rules:
        only = f"({r.only} only) " if r.only else ""
        lines.append(f"{r.pattern:<{width}}  # {only}{r.reason}")
    return "\n".join(lines) + "\n"


def _normalize(names: Iterable[str]) -> set[str]:
    return {strip_prefix(n) for n in names}


def _shape(shapes: Mapping[str, Sequence[int]] | None, key: str) -> tuple[int, ...] | None:
    if not shapes:
        return None
    for k, v in shapes.items():
        if strip_prefix(k) == key:
            return tuple(v)
    return None


def detect_family(names: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """Family key from tensor names (and shapes when known), as ComfyUI 0.8 detects (DESIGN §2).

    - Z-Image: ``cap_embedder.1.weight`` with dim (its out_features) 3840. Other widths are
      Lumina2 models that ComfyUI does not treat as Z-Image: "generic".
    - Wan: ``head.modulation`` (or, from Linear layers only, ``head.head`` + ``time_projection.1``).
      ``head.head`` with out 192 (out_dim 48 x patch 1x2x2) is
      Wan 2.2 TI2V 5B; otherwise "wan21" (T2V/I2V 14B, 1.3B, and Wan 2.2 A14B experts, which
      have identical names and shapes and cannot be told apart).
    Names may carry ``diffusion_model.``/``model.diffusion_model.`` prefixes.
    """
    keys = _normalize(names)
    if shapes:
        keys |= _normalize(shapes)
    if "cap_embedder.1.weight" in keys:
        s = _shape(shapes, "cap_embedder.1.weight")
        return "zimage" if s is None or s[0] == 3840 else "generic"
    # From Linear layers alone (no head.modulation, a Parameter): head.head + time_projection.
    if "head.modulation" in keys or {"head.head.weight", "time_projection.1.weight"} <= keys:
        s = _shape(shapes, "head.head.weight")
        return "wan22_5b" if s is not None and s[0] == 192 else "wan21"
    return "generic"


def describe_model(names: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """A human description of the detected model, e.g. ``Wan 2.1 I2V (dim 5120, 40 blocks)``."""
    keys = _normalize(names)
    if shapes:
        keys |= _normalize(shapes)
    fam = detect_family(keys, shapes)
    blocks = {k.split(".")[1] for k in keys if k.startswith(("blocks.", "layers.")) and k.count(".") > 1}
    if fam == "zimage":
        return f"Z-Image ({len(blocks)} layers)"
    if fam in ("wan21", "wan22_5b"):
        s = _shape(shapes, "head.head.weight")
        dim = f"dim {s[1]}, " if s else ""
        kind = "I2V" if any(k.startswith("img_emb.") for k in keys) else "T2V"
        name = "Wan 2.2 TI2V 5B" if fam == "wan22_5b" else f"Wan 2.1 {kind} or Wan 2.2 A14B expert"
        return f"{name} ({dim}{len(blocks)} blocks)"
    return "generic model"
