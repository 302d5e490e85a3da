"""What a model family is, and the registry of families.

A family module (zimage.py, wan.py, generic.py) holds everything known about one model family:
its display name, default ignore list (with the reason for each line), fused-layer and alias
maps, how to recognise it from a checkpoint's tensor names, and the full-size Linear shapes of
its reference models. It registers itself here; adding a family is a new module plus one import
in quant/models/__init__.py. The logic that applies a family's tables lives in quant/selection/.
Layer names are ComfyUI's (without the ``diffusion_model.`` prefix).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import PatternError
from ..selection.actions import line_prefix
from ..selection.patterns import PatternSet, parse_patterns, strip_prefix

__all__ = [
    "FAMILIES",
    "FAMILY_ALIASES",
    "REFERENCE_MODELS",
    "Family",
    "ReferenceModel",
    "get_reference",
    "FusedLayer",
    "IgnoreRule",
    "default_ignore_text",
    "default_rules",
    "describe_model",
    "detect_family",
    "family_choices",
    "get_family",
    "register_family",
    "seeded_randn",
    "shape_of",
    "unloadable_layout",
]


@dataclass(frozen=True)
class IgnoreRule:
    """One line of a family's defaults: a pattern, why, and what it asks for (selection/actions.py:
    "keep" the layers in the compute dtype, "weights-only", or "quantize")."""

    pattern: str
    reason: str
    only: str = ""  # the variants that have the layer ("I2V"); empty = every variant
    action: str = "keep"


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
    # One line naming the model a checkpoint holds (its variant, width, depth); None: display_name.
    describe: Callable[[set[str], Mapping[str, Sequence[int]] | None], str] | None = None


# names -> why ComfyUI cannot load a file in this layout (and what to use instead), or None.
LayoutCheck = Callable[[set[str]], "str | None"]
# (names, shapes) -> family key or None. Detectors run in registration order; the first answer wins.
Detector = Callable[[set[str], "Mapping[str, Sequence[int]] | None"], "str | None"]
# (layer name, out_features, in_features) of a full-size model, in file order.
LinearShapes = list[tuple[str, int, int]]


FAMILIES: dict[str, Family] = {}
FAMILY_ALIASES: dict[str, str] = {}
_DETECTORS: list[Detector] = []
_LAYOUT_CHECKS: list[LayoutCheck] = []


@dataclass(frozen=True)
class ReferenceModel:
    """A full-size model of a family, by its published config (shapes only, no weights). Used by the
    CLI's `--reference`, the benchmarks and the tests; its `name` is the one name it has anywhere."""

    name: str
    family: str
    linears: Callable[[], LinearShapes]  # every Linear, in file order
    detected_tensors: Callable[[], dict[str, tuple[int, ...]]]  # the other tensors detection reads
    # ComfyUI's model class ("module:Class") and its constructor options, for benchmarks that build
    # the real model with random weights; empty when ComfyUI has no class for it here.
    comfy_class: str = ""
    comfy_config: Mapping[str, object] = field(default_factory=dict)
    description: str = ""
    # For benchmarks and tests of the real model class: the options of a CI-size copy (tiny widths,
    # 2 blocks), and (quick, device, dtype) -> the forward's keyword inputs for one step, with what
    # they stand for (e.g. "1280x704x121 (27280 tokens)").
    tiny_overrides: Mapping[str, object] = field(default_factory=dict)
    example_inputs: Callable[..., dict] | None = None
    inputs_description: str = ""


REFERENCE_MODELS: dict[str, ReferenceModel] = {}


def register_family(
    family: Family,
    *,
    aliases: Sequence[str] = (),
    detect: Detector | None = None,
    references: Sequence[ReferenceModel] = (),
    unloadable_layout: LayoutCheck | None = None,
) -> Family:
    """Add a family with its other names, its detector, its reference models and a check that
    recognises files of this model in a layout ComfyUI does not load (e.g. diffusers names)."""
    for name in (family.key, *aliases):
        if name in FAMILIES or name in FAMILY_ALIASES:
            raise ValueError(f"model family name {name!r} is registered twice")
    FAMILIES[family.key] = family
    FAMILY_ALIASES.update(dict.fromkeys(aliases, family.key))
    if detect is not None:
        _DETECTORS.append(detect)
    if unloadable_layout is not None:
        _LAYOUT_CHECKS.append(unloadable_layout)
    for ref in references:
        REFERENCE_MODELS[ref.name] = ref
    return family


def get_reference(model: str) -> ReferenceModel:
    """The reference model named `model` (ValueError listing the known names)."""
    try:
        return REFERENCE_MODELS[model]
    except KeyError:
        raise ValueError(f"unknown reference model {model!r}; known: {', '.join(REFERENCE_MODELS)}") from None


def seeded_randn(device, dtype, seed: int = 1) -> Callable[..., object]:
    """randn(*shape, scale=1.0) drawing from one seeded generator: example inputs that are the same
    on every run."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0):
        return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)

    return randn


def reference_linear_shapes(model: str) -> LinearShapes:
    """(name, out_features, in_features) of every Linear of a full-size reference model, in file order."""
    return get_reference(model).linears()


def reference_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """A header-like ``{tensor name: shape}`` for the model: Linear weights and biases plus the
    non-Linear tensors detection looks at (Wan's ``head.modulation``, norms)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, out_features, in_features in reference_linear_shapes(model):
        shapes[f"{name}.weight"] = (out_features, in_features)
        shapes[f"{name}.bias"] = (out_features,)
    shapes.update(get_reference(model).detected_tensors())
    return shapes


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


def default_rules(family: str, names: Iterable[str] | None = None) -> list[IgnoreRule]:
    """The family's default ignore rules; with ``names`` (the model's Linear layer names), only those
    that match one of them (e.g. no I2V-only lines on a T2V model)."""
    rules = list(get_family(family).ignore)
    if names is None:
        return rules
    ps = PatternSet(parse_patterns("\n".join(r.pattern for r in rules)))
    hit: set[int] = set()
    for n in names:
        hit.update(ps.match(strip_prefix(n)))
    return [r for i, r in enumerate(rules) if i in hit]


def default_ignore_text(family: str, names: Iterable[str] | None = None) -> str:
    """The default ignore text the loader node shows: one pattern per line with ``# reason``.

    With ``names`` (the model's Linear layer names), lines that match none of them (e.g. I2V-only
    layers on a T2V model) are left out, so the defaults never produce "matched nothing" warnings.
    """
    fam = get_family(family)
    rules = default_rules(family, names)
    texts = [line_prefix(r.action) + r.pattern for r in rules]
    width = max((len(t) for t in texts), default=0)
    lines = [
        f"# {fam.display_name}: layers kept in bf16, one pattern per line ('weights-only:' = quantized "
        "weights, bf16 activations; the last matching line decides; '#' starts a comment)"
    ]
    for r, t in zip(rules, texts, strict=True):
        only = f"({r.only} only) " if r.only else ""
        lines.append(f"{t:<{width}}  # {only}{r.reason}")
    return "\n".join(lines) + "\n"


def _normalize(names: Iterable[str]) -> set[str]:
    return {strip_prefix(n) for n in names}


def shape_of(shapes: Mapping[str, Sequence[int]] | None, key: str) -> tuple[int, ...] | None:
    """The shape of tensor `key` (names compared without the diffusion_model. prefix), if known."""
    if not shapes:
        return None
    for k, v in shapes.items():
        if strip_prefix(k) == key:
            return tuple(v)
    return None


def detect_family(names: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """Family key from tensor names (and shapes when known), as ComfyUI 0.8 detects; each family
    module says how it is recognised. Names may carry ``diffusion_model.``/``model.diffusion_model.``
    prefixes. Nothing recognised: "generic"."""
    keys = _normalize(names)
    if shapes:
        keys |= _normalize(shapes)
    for detect in _DETECTORS:
        found = detect(keys, shapes)
        if found is not None:
            return found
    return "generic"


def unloadable_layout(names: Iterable[str]) -> str | None:
    """Why ComfyUI 0.8 cannot load a file with these tensor names, and what to use instead; None
    when the layout is one it loads. ComfyUI strips only a ``model.diffusion_model.`` prefix: a
    bare ``diffusion_model.`` one leaves names its detection does not know."""
    raw = list(names)
    bare = [n for n in raw if n.startswith("diffusion_model.")]
    if bare and len(bare) * 2 > len(raw):
        return (
            f"tensor names start with 'diffusion_model.' (e.g. {bare[0]!r}); ComfyUI strips only "
            "'model.diffusion_model.', so it cannot detect this model: save the file with the "
            "'model.diffusion_model.' prefix or without any prefix"
        )
    keys = _normalize(raw)
    for check in _LAYOUT_CHECKS:
        why = check(keys)
        if why is not None:
            return why
    return None


def describe_model(names: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """A human description of the detected model, e.g. ``Wan 2.1 I2V (dim 5120, 40 blocks)``."""
    keys = _normalize(names)
    if shapes:
        keys |= _normalize(shapes)
    fam = get_family(detect_family(keys, shapes))
    return fam.describe(keys, shapes) if fam.describe else f"{fam.display_name} model"
