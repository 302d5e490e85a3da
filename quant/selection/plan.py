"""Which Linear layers get quantized, and why: a pure function from (layer names and shapes,
format, ignored-layers text, model family) to a plan. The loader node, the web preview route and
the CLI all call `build_plan`; pattern semantics live in quant/patterns.py, per-family data in
quant/families.py.

Rules, in order, for each Linear layer (first that applies decides):
1. an ignore pattern matches the layer (directly, through an alias such as sglang's ``w13``, or
   through all parts of a fused layer) -> kept; source "default" when the text is the family's
   default (``ignore_text=None``) or the deciding pattern is one of the family's default lines,
   else "pattern";
2. ``out_features < min_out_features`` -> kept, source "size";
3. the format cannot take the shape (``format.unsupported_reason``) -> kept, source "format";
4. otherwise quantized, source "eligible".
A pattern that selects only some parts of a fused layer is an error (the parts are one weight).
Every pattern that matched nothing becomes a warning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..errors import PatternError
from ..formats import get_format
from ..models import FusedLayer, default_ignore_text, detect_family, get_family, reference_linear_shapes
from .patterns import PatternSet, parse_patterns, strip_prefix

__all__ = [
    "LinearInfo",
    "LayerDecision",
    "QuantPlan",
    "build_plan",
    "linears_from_module",
    "linears_from_shapes",
    "detect_family",
    "default_ignore_text",
    "compact_names",
]

# 2-D ".weight" tensors that are lookup tables, not Linear weights (never quantized).
_EMBEDDING_TABLES = frozenset(
    {"embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_embedding", "shared"}
)


@dataclass(frozen=True)
class LinearInfo:
    name: str  # without "diffusion_model." prefix, without ".weight"
    out_features: int
    in_features: int


def linears_from_module(module: torch.nn.Module) -> list[LinearInfo]:
    """Every ``nn.Linear`` (ComfyUI's ops Linear classes subclass it) of a module, in order."""
    out = []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            out.append(LinearInfo(strip_prefix(name), int(m.out_features), int(m.in_features)))
    return out


def reference_linears(model: str) -> list[LinearInfo]:
    """The Linear layers of a full-size reference model (quant.models.REFERENCE_MODELS)."""
    return [LinearInfo(n, o, i) for n, o, i in reference_linear_shapes(model)]


def linears_from_shapes(shapes: Mapping[str, Sequence[int]]) -> list[LinearInfo]:
    """Linear layers of a state dict or safetensors header: ``<name>.weight`` tensors with 2 dims.

    Norms (1-D), convolutions (3-D+), biases and embedding tables (by module name) are left out.
    Known prefixes (``diffusion_model.``, ``model.diffusion_model.``) are stripped.
    """
    out = []
    seen = set()
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        name = strip_prefix(key[: -len(".weight")])
        if name.rsplit(".", 1)[-1] in _EMBEDDING_TABLES or name in seen:
            continue
        seen.add(name)
        out.append(LinearInfo(name, int(shape[0]), int(shape[1])))
    return out


@dataclass(frozen=True)
class LayerDecision:
    name: str
    out_features: int
    in_features: int
    quantize: bool
    reason: str
    source: str  # "pattern", "default", "size", "format", "eligible"
    pattern: str | None = None  # the pattern that decided (source pattern/default)
    line: int | None = None  # its line in the ignore text


@dataclass
class QuantPlan:
    format: str
    family: str
    decisions: list[LayerDecision]
    warnings: list[str] = field(default_factory=list)
    min_out_features: int = 256
    ignore_text: str = ""
    packed_nbytes: object = field(default=None, repr=False, compare=False)  # (out, in) -> bytes

    def __post_init__(self):
        self._by_name = {d.name: d for d in self.decisions}

    def decision(self, name: str) -> LayerDecision | None:
        return self._by_name.get(strip_prefix(name))

    def quantized(self) -> list[LayerDecision]:
        return [d for d in self.decisions if d.quantize]

    def kept(self) -> list[LayerDecision]:
        return [d for d in self.decisions if not d.quantize]

    def bytes_before(self, dtype_bytes: int = 2) -> int:
        """Bytes of all Linear weights (biases not counted) in a ``dtype_bytes`` dtype."""
        return sum(d.out_features * d.in_features * dtype_bytes for d in self.decisions)

    def bytes_after(self, dtype_bytes: int = 2) -> int:
        """Bytes of the Linear weights after quantization: packed data + scales for quantized
        layers (the format's ``packed_nbytes``), ``dtype_bytes`` per weight for kept ones."""
        nbytes = self.packed_nbytes or _get_format(self.format).packed_nbytes
        return sum(
            nbytes(d.out_features, d.in_features)
            if d.quantize
            else d.out_features * d.in_features * dtype_bytes
            for d in self.decisions
        )

    def summary(self, dtype_bytes: int = 2) -> str:
        """Human-readable plan: counts, bytes, kept layers grouped by reason, warnings."""
        q, k = self.quantized(), self.kept()
        fam = get_family(self.family)
        before, after = self.bytes_before(dtype_bytes), self.bytes_after(dtype_bytes)
        ratio = f" ({100 * after / before:.1f}%)" if before else ""
        lines = [
            f"{fam.display_name} [{self.family}], format {self.format}, "
            f"min_out_features {self.min_out_features}",
            f"{len(self.decisions)} Linear layers: quantize {len(q)} ({_params(q)} weights), "
            f"keep {len(k)} ({_params(k)} weights)",
            f"Linear weights: {format_bytes(before)} -> {format_bytes(after)}{ratio}",
        ]
        if q:
            lines.append("quantize:")
            lines += [f"  {g}" for g in compact_names([d.name for d in q])]
        groups: dict[str, list[str]] = {}
        for d in k:
            why = d.reason if d.source in ("pattern", "default") else f"[{d.source}] {d.reason}"
            groups.setdefault(why, []).append(d.name)
        if groups:
            lines.append("keep (bf16):")
            for why, names in groups.items():
                lines.append(f"  {why}")
                lines += [f"    {g}" for g in compact_names(names)]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self, dtype_bytes: int = 2) -> dict:
        """JSON-ready plan for the web preview and the load report."""
        return {
            "format": self.format,
            "family": self.family,
            "family_name": get_family(self.family).display_name,
            "min_out_features": self.min_out_features,
            "ignore_text": self.ignore_text,
            "counts": {
                "layers": len(self.decisions),
                "quantized": len(self.quantized()),
                "kept": len(self.kept()),
                "quantized_params": sum(d.out_features * d.in_features for d in self.quantized()),
                "kept_params": sum(d.out_features * d.in_features for d in self.kept()),
            },
            "bytes_before": self.bytes_before(dtype_bytes),
            "bytes_after": self.bytes_after(dtype_bytes),
            "warnings": list(self.warnings),
            "decisions": [asdict(d) for d in self.decisions],
        }


def _params(ds: Sequence[LayerDecision]) -> str:
    n = sum(d.out_features * d.in_features for d in ds)
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def format_bytes(n: int) -> str:
    """Bytes for people: GiB from 128 MiB up, MiB below (the plan, the CLI and the load report)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def _ranges(values: Iterable[int]) -> str:
    vs = sorted(set(values))
    parts, start = [], vs[0]
    for a, b in zip(vs, [*vs[1:], None], strict=True):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)


def compact_names(names: Sequence[str]) -> list[str]:
    """Collapse numbered names: ``layers.{0-29}.attention.qkv`` instead of 30 lines (in order)."""
    groups: dict[str, list[tuple[str, ...]]] = {}
    for n in names:
        segs = n.split(".")
        template = ".".join("#" if s.isdigit() else s for s in segs)
        groups.setdefault(template, []).append(tuple(s for s in segs if s.isdigit()))
    out = []
    for template, nums in groups.items():
        slots = list(zip(*nums, strict=True)) if nums and nums[0] else []
        rendered = []
        for slot in slots:
            vals = {int(v) for v in slot}
            rendered.append(str(next(iter(vals))) if len(vals) == 1 else "{" + _ranges(vals) + "}")
        text = template
        for r in rendered:
            text = text.replace("#", r, 1)
        out.append(text if len(nums) == 1 else f"{text}  ({len(nums)} layers)")
    return out


# --- formats -----------------------------------------------------------------------------------


def _get_format(name: str):
    return get_format(name)


# --- plan ----------------------------------------------------------------------------------------


def _suffix_prefix(name: str, suffix: str) -> str | None:
    """``layers.3.`` for name ``layers.3.attention.qkv`` and suffix ``attention.qkv``."""
    if name == suffix:
        return ""
    if name.endswith("." + suffix):
        return name[: -len(suffix)]
    return None


def build_plan(
    layers: Sequence[LinearInfo],
    format: str,
    ignore_text: str | None,
    family: str = "generic",
    min_out_features: int = 256,
    *,
    with_defaults: bool = False,
) -> QuantPlan:
    """Decide quantize/keep for every Linear. See the module docstring for the rules.

    ``ignore_text=None`` uses the family's defaults; ``""`` quantizes everything eligible;
    ``with_defaults=True`` applies the family's defaults and then ``ignore_text``'s own patterns
    (the ``# auto`` text of the loader), each message naming the line of the text the user typed.
    ``family="auto"`` detects it from the layer names. Raises PatternError for a bad pattern or a
    pattern that ignores only part of a fused layer; ValueError for an unknown format.
    """
    fmt = _get_format(format)
    if min_out_features < 0:
        raise ValueError(f"min_out_features must be >= 0, got {min_out_features}")
    layers = [LinearInfo(strip_prefix(li.name), li.out_features, li.in_features) for li in layers]
    names = [li.name for li in layers]
    if family == "auto":
        family = detect_family(
            names, {f"{li.name}.weight": (li.out_features, li.in_features) for li in layers}
        )
    fam = get_family(family)
    defaults_text = default_ignore_text(family, names) if ignore_text is None or with_defaults else ""
    user_text = ignore_text or ""
    # The defaults and the user's text are parsed apart, so every line number a message gives is a
    # line of the text it came from: the user's own for anything they typed.
    default_pats = parse_patterns(defaults_text)
    patterns = default_pats + parse_patterns(user_text)
    n_default = len(default_pats)
    text = defaults_text + user_text if with_defaults else (defaults_text or user_text)
    ps = PatternSet(patterns)
    # A line of the family's default list keeps source "default" even inside a user's text (the
    # loader shows the defaults and users append to them), so reports can tell the two apart.
    default_patterns = {r.pattern for r in fam.ignore}

    def where(i: int) -> str:
        p = patterns[i]
        return f"{p.text!r} (the {family} defaults)" if i < n_default else p.where()
    used: set[int] = set()

    def match_aliases(name: str) -> tuple[list[int], dict[int, str]]:
        """Patterns matching the name directly or through one of its aliases (-> alias name)."""
        hits = ps.match(name)
        via: dict[int, str] = {}
        for suffix, aliases in fam.aliases:
            prefix = _suffix_prefix(name, suffix)
            if prefix is None:
                continue
            for a in aliases:
                for i in ps.match(prefix + a):
                    if i not in hits:
                        via.setdefault(i, a)
        return sorted(set(hits) | set(via)), via

    decisions: list[LayerDecision] = []
    for li in layers:
        hits, via = match_aliases(li.name) if patterns else ([], {})
        used.update(hits)
        fused_note = ""
        if patterns:
            for fl in fam.fused:
                prefix = _suffix_prefix(li.name, fl.name)
                if prefix is not None:
                    part_hits = [
                        sorted({i for alias in part for i in ps.match(prefix + alias)}) for part in fl.parts
                    ]
                    for ph in part_hits:
                        used.update(ph)
                    if not hits:
                        hits, fused_note = _check_fused(li.name, prefix, fl, part_hits, patterns)
        if hits:
            p = patterns[hits[0]]
            how = f" as {via[hits[0]]!r}" if hits[0] in via else ""
            why = f": {p.comment}" if p.comment else ""
            is_default = hits[0] < n_default or p.text in default_patterns
            decisions.append(
                _decide(
                    li,
                    False,
                    f"ignored by pattern {where(hits[0])}{how}{fused_note}{why}",
                    "default" if is_default else "pattern",
                    p.text,
                    None if hits[0] < n_default else p.line,
                )
            )
            continue
        if li.out_features < min_out_features:
            decisions.append(
                _decide(
                    li, False, f"out_features {li.out_features} < min_out_features {min_out_features}", "size"
                )
            )
            continue
        bad = fmt.unsupported_reason(li.out_features, li.in_features)
        if bad:
            decisions.append(_decide(li, False, f"{fmt.name}: {bad}", "format"))
            continue
        decisions.append(_decide(li, True, f"quantized to {fmt.name}", "eligible"))

    warnings = [f"pattern {where(i)} matched no layer" for i in range(len(patterns)) if i not in used]
    return QuantPlan(
        format=fmt.name,
        family=family,
        decisions=decisions,
        warnings=warnings,
        min_out_features=min_out_features,
        ignore_text=text,
        packed_nbytes=fmt.packed_nbytes,
    )


def _decide(
    li: LinearInfo,
    quantize: bool,
    reason: str,
    source: str,
    pattern: str | None = None,
    line: int | None = None,
) -> LayerDecision:
    """The decision for one Linear: its name and shape from `li`, the rest as decided."""
    return LayerDecision(li.name, li.out_features, li.in_features, quantize, reason, source, pattern, line)


def keep_all_plan(layers: Sequence[LinearInfo], family: str, reason: str, source: str) -> QuantPlan:
    """A plan that keeps every Linear as it is (a plain load), each with `reason`."""
    return QuantPlan(
        format=source,
        family=family,
        decisions=[_decide(li, False, reason, source) for li in layers],
        packed_nbytes=lambda out_features, in_features: 2 * out_features * in_features,
    )


def _check_fused(name, prefix, fl: FusedLayer, part_hits, patterns) -> tuple[list[int], str]:
    """All parts ignored -> the fused layer is ignored; some parts -> PatternError."""
    if all(part_hits):
        first = min(ph[0] for ph in part_hits)
        parts = ", ".join(part[0] for part in fl.parts)
        return [first], f" (all parts {parts} of the fused {fl.name!r} are ignored)"
    if any(part_hits):
        i = next(ph[0] for ph in part_hits if ph)
        hit_parts = [part[0] for part, ph in zip(fl.parts, part_hits, strict=True) if ph]
        missing = [part[0] for part, ph in zip(fl.parts, part_hits, strict=True) if not ph]
        raise PatternError(
            f"pattern {patterns[i].where()} ignores only {', '.join(hit_parts)} of the fused layer "
            f"{name!r}: {fl.why}, so its parts cannot be kept apart. Ignore {fl.name!r} "
            f"(all of {', '.join(part[0] for part in fl.parts)}) or also ignore {', '.join(missing)}."
        )
    return [], ""
