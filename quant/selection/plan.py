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

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from ..errors import PatternError
from ..formats import get_format
from ..models import FusedLayer, default_ignore_text, detect_family, get_family
from .actions import KEEP, WEIGHTS_ONLY, parse_lines
from .layers import LinearInfo
from .patterns import PatternSet, strip_prefix

__all__ = ["LayerDecision", "QuantPlan", "build_plan", "compact_names", "format_bytes", "keep_all_plan"]

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
    # what a `weights-only:` / `quantize:` line asked for ("" when no line chose: the format's own
    # compute mode); see actions.py
    precision: str = ""


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
        by_precision: dict[str, list[str]] = {}
        for d in q:
            by_precision.setdefault(d.precision, []).append(d.name)
        for precision, names in by_precision.items():
            label = {"": "", "weights-only": " (weights only, activations in the compute dtype)"}.get(
                precision, f" ({precision})"
            )
            lines.append(f"quantize{label}:")
            lines += [f"  {g}" for g in compact_names(names)]
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
                "weights_only": sum(d.precision == "weights-only" for d in self.quantized()),
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
    default_pats = parse_lines(defaults_text)
    parsed = default_pats + parse_lines(user_text)
    patterns = [p for p, _ in parsed]
    actions = [a for _, a in parsed]
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
                        hits, fused_note = _check_fused(li.name, prefix, fl, part_hits, patterns, actions)
        action, by = KEEP, ""
        if hits:
            last = hits[-1]  # the last line that matches decides (lines below the defaults override them)
            p = patterns[last]
            how = f" as {via[last]!r}" if last in via else ""
            why = f": {p.comment}" if p.comment else ""
            is_default = last < n_default or p.text in default_patterns
            source, line = ("default" if is_default else "pattern"), (None if last < n_default else p.line)
            action, by = actions[last], f"pattern {where(last)}{how}{fused_note}{why}"
            if action == KEEP:
                decisions.append(_decide(li, False, f"ignored by {by}", source, p.text, line))
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
        if action == KEEP:
            decisions.append(_decide(li, True, f"quantized to {fmt.name}", "eligible"))
        else:
            mode = "weights only" if action == WEIGHTS_ONLY else "weights and activations"
            reason = f"quantized to {fmt.name}, {mode}, by {by}"
            decisions.append(_decide(li, True, reason, source, p.text, line, action))

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
    precision: str = "",
) -> LayerDecision:
    """The decision for one Linear: its name and shape from `li`, the rest as decided."""
    return LayerDecision(
        li.name, li.out_features, li.in_features, quantize, reason, source, pattern, line, precision
    )


def keep_all_plan(layers: Sequence[LinearInfo], family: str, reason: str, source: str) -> QuantPlan:
    """A plan that keeps every Linear as it is (a plain load), each with `reason`."""
    return QuantPlan(
        format=source,
        family=family,
        decisions=[_decide(li, False, reason, source) for li in layers],
        packed_nbytes=lambda out_features, in_features: 2 * out_features * in_features,
    )


def _check_fused(name, prefix, fl: FusedLayer, part_hits, patterns, actions) -> tuple[list[int], str]:
    """All parts selected alike -> the fused layer is; some parts (or parts asking for different
    precisions) -> PatternError: the parts are one weight."""
    parts = ", ".join(part[0] for part in fl.parts)
    if all(part_hits):
        deciding = [ph[-1] for ph in part_hits]
        if len({actions[i] for i in deciding}) > 1:
            asked = ", ".join(f"{part[0]}: {actions[i]}" for part, i in zip(fl.parts, deciding, strict=True))
            raise PatternError(
                f"pattern {patterns[max(deciding)].where()} gives the parts of the fused layer {name!r} "
                f"different precisions ({asked}): {fl.why}, so its parts cannot be treated apart. "
                f"Write one line for {fl.name!r}."
            )
        return sorted({i for ph in part_hits for i in ph}), f" (all parts {parts} of the fused {fl.name!r})"
    if any(part_hits):
        i = next(ph[0] for ph in part_hits if ph)
        hit_parts = [part[0] for part, ph in zip(fl.parts, part_hits, strict=True) if ph]
        missing = [part[0] for part, ph in zip(fl.parts, part_hits, strict=True) if not ph]
        raise PatternError(
            f"pattern {patterns[i].where()} ignores only {', '.join(hit_parts)} of the fused layer "
            f"{name!r}: {fl.why}, so its parts cannot be kept apart. Ignore {fl.name!r} "
            f"(all of {parts}) or also ignore {', '.join(missing)}."
        )
    return [], ""
