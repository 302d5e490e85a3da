"""Keep the most sensitive layers in bf16: rules ("worst 5%", "below 20 dB", "max 12 GB"), the
choice from measured per-layer SQNR, the plan rewrite, and the text users paste into the
loader's ignored-layers field. Measurements come from quant/quality.py."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import SensitivityRuleError
from ..formats import get_format
from .weights import measure_weight_sqnr, other_param_bytes


def _ranked_worst_first(errors: Mapping[str, float]) -> list[str]:
    """Layer names from lowest SQNR (worst) to highest; NaN counts as worst; ties by name so the
    choice is deterministic."""

    def key(name: str) -> tuple[float, str]:
        v = errors[name]
        return (-math.inf if math.isnan(v) else v, name)

    return sorted(errors, key=key)


def choose_sensitive_layers(
    errors: Mapping[str, float],
    sizes: Mapping[str, int] | None = None,
    *,
    threshold_db: float | None = None,
    keep_worst_fraction: float | None = None,
    byte_budget: int | None = None,
    base_bytes: int = 0,
) -> list[str]:
    """Pick the layers to keep in bf16, worst first.

    `errors`: per-layer SQNR in dB (higher is better; NaN counts as worst). `sizes`: per layer, the
    bytes that keeping it in bf16 ADDS over its quantized form (bf16 bytes − packed bytes); needed
    for `byte_budget`.
    - `threshold_db`: every layer whose SQNR is below it.
    - `keep_worst_fraction`: the worst ceil(f·n) layers (0.05 = "keep the worst 5%").
    - `byte_budget`: the bytes the whole model may take. `base_bytes` is what it takes with every
      candidate quantized (plus its other parameters). Alone, it keeps the worst layers that still
      fit; with a threshold/fraction it caps their choice. A layer that does not fit is skipped and
      smaller, less sensitive ones may still be kept (the budget is used, order stays worst first).
    With threshold and fraction both given, a layer is kept when either rule picks it.
    """
    if keep_worst_fraction is not None and not 0.0 <= keep_worst_fraction <= 1.0:
        raise ValueError(f"keep_worst_fraction must be in [0, 1], got {keep_worst_fraction}")
    if byte_budget is not None and sizes is None:
        raise ValueError("byte_budget needs sizes (bytes added per kept layer)")
    ranked = _ranked_worst_first(errors)
    if threshold_db is None and keep_worst_fraction is None:
        picked = ranked if byte_budget is not None else []
    else:
        chosen: set[str] = set()
        if threshold_db is not None:
            chosen.update(n for n in ranked if math.isnan(errors[n]) or errors[n] < threshold_db)
        if keep_worst_fraction is not None:
            chosen.update(ranked[: math.ceil(keep_worst_fraction * len(ranked) - 1e-9)])
        picked = [n for n in ranked if n in chosen]
    if byte_budget is None:
        return picked
    used = base_bytes
    kept = []
    for name in picked:
        extra = int(sizes.get(name, 0))
        if used + extra <= byte_budget:
            kept.append(name)
            used += extra
    return kept


def ignore_lines(names: Sequence[str], errors: Mapping[str, float] | None = None, *, header: str = "") -> str:
    """Text to paste into the loader's ignored-layers field: one exact layer name per line.

    A full layer name is a valid pattern that matches that layer at dot boundaries; Linear names are
    leaves, so it matches no other Linear of these models. Each line carries its SQNR as a comment.
    """
    out = [f"# {header}"] if header else []
    for n in names:
        if errors is not None and n in errors:
            out.append(f"{n}  # {errors[n]:.1f} dB")
        else:
            out.append(n)
    return "\n".join(out)


@dataclass(frozen=True)
class SensitivityRule:
    """A parsed `keep_sensitive` setting. All None means "keep nothing extra"."""

    threshold_db: float | None = None
    keep_worst_fraction: float | None = None
    byte_budget: int | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.threshold_db, self.keep_worst_fraction, self.byte_budget))

    @property
    def is_local(self) -> bool:
        """True when each layer can be decided alone, as it loads (threshold only)."""
        return self.threshold_db is not None and self.keep_worst_fraction is None and self.byte_budget is None

    def keeps(self, sqnr: float) -> bool:
        """For a local rule: keep this layer in bf16?"""
        return self.threshold_db is not None and (math.isnan(sqnr) or sqnr < self.threshold_db)

    def describe(self) -> str:
        parts = []
        if self.keep_worst_fraction is not None:
            parts.append(f"worst {self.keep_worst_fraction * 100:g}%")
        if self.threshold_db is not None:
            parts.append(f"below {self.threshold_db:g} dB")
        if self.byte_budget is not None:
            parts.append(f"max {self.byte_budget / 1e9:g} GB")
        return ", ".join(parts) if parts else "none"


_UNITS = {"gb": 10**9, "gib": 2**30, "mb": 10**6, "mib": 2**20}
_RE_WORST = re.compile(r"^worst\s+([0-9.]+)\s*%$")
_RE_DB = re.compile(r"^(?:<|below|under)\s*([-0-9.]+)\s*db$")
_RE_BYTES = re.compile(r"^(?:<=|max|budget|at most)\s*([0-9.]+)\s*(gib|gb|mib|mb)$")


def parse_sensitivity_rule(text: str | None) -> SensitivityRule:
    """Parse the loader's `keep_sensitive` text: comma-separated parts, case-insensitive:
    `none` / empty; `worst 5%`; `below 20 dB` (or `< 20 dB`); `max 12 GB` (or `<= 12 GiB`,
    `budget 12000 MB`). Unknown text raises ValueError quoting the part and the accepted forms."""
    if text is None or text.strip().lower() in ("", "none", "off"):
        return SensitivityRule()
    fields: dict[str, float | int] = {}
    for raw in text.split(","):
        part = " ".join(raw.strip().lower().split())
        if not part:
            continue
        try:
            if m := _RE_WORST.match(part):
                fields["keep_worst_fraction"] = float(m.group(1)) / 100.0
            elif m := _RE_DB.match(part):
                fields["threshold_db"] = float(m.group(1))
            elif m := _RE_BYTES.match(part):
                fields["byte_budget"] = int(float(m.group(1)) * _UNITS[m.group(2)])
            else:
                raise ValueError
        except ValueError:
            raise SensitivityRuleError(
                f"keep_sensitive: cannot read {raw.strip()!r}; use 'none', 'worst 5%', "
                "'below 20 dB' or 'max 12 GB' (comma-separated to combine)"
            ) from None
    rule = SensitivityRule(**fields)
    if rule.keep_worst_fraction is not None and not 0.0 <= rule.keep_worst_fraction <= 1.0:
        raise SensitivityRuleError(f"keep_sensitive: {text!r}: the percentage must be between 0 and 100")
    return rule


def plan_with_sensitivity(plan, tensors, rule: SensitivityRule | str | None, **kw):
    """The loader's one call for `keep_sensitive`: measure (`measure_weight_sqnr`) then choose
    (`apply_sensitivity`). Returns `(plan, kept_names, text)`; `text` is a report note listing
    the kept layers as lines to paste into the ignored-layers field ("" when the rule is none).
    `tensors`: a state dict (only the planned weights are read) or `(key, tensor)` pairs.
    `kw`: `device`, `rows` (measurement); `shapes` (the file's {key: shape}, to count the other
    parameters for a byte budget) or `other_bytes`; `dtype_bytes` (budget)."""
    if not isinstance(rule, SensitivityRule):
        rule = parse_sensitivity_rule(rule)
    if not rule.active:
        return plan, [], ""
    mkw = {k: kw.pop(k) for k in ("device", "rows") if k in kw}
    shapes = kw.pop("shapes", None)
    if shapes is not None and "other_bytes" not in kw:
        kw["other_bytes"] = other_param_bytes(shapes, plan, kw.get("dtype_bytes", 2))
    pairs = tensors
    if isinstance(tensors, Mapping):  # read only weights (lazy state dicts read on first use)
        pairs = ((k, tensors[k]) for k in list(tensors.keys()) if k.endswith(".weight"))
    sq = measure_weight_sqnr(pairs, plan, **mkw)
    new, kept = apply_sensitivity(plan, sq, rule, **kw)
    if not kept:
        return new, kept, f"keep_sensitive ({rule.describe()}): no layer selected"
    head = f"keep_sensitive ({rule.describe()}): {len(kept)} layer(s) kept in high precision"
    return new, kept, head + ":\n" + ignore_lines(kept, sq)


def apply_sensitivity(
    plan,
    per_layer_sqnr: Mapping[str, float],
    rule: SensitivityRule | str | None,
    *,
    other_bytes: int = 0,
    dtype_bytes: int = 2,
):
    """Return `(new_plan, kept_names)`: `plan` (a selection.QuantPlan, not modified) with the
    layers the rule picks switched to "keep" (source "sensitivity", reason quoting their SQNR).

    Candidates are the plan's quantized layers that have a measured SQNR. For a byte budget,
    `other_bytes` is what the model holds besides its Linear weights (norms, biases, embeddings)
    and each kept layer costs its bf16 bytes (`dtype_bytes` per weight) minus its packed bytes.
    Paste `ignore_lines(kept_names, per_layer_sqnr)` into the ignored-layers field to make the
    choice permanent."""
    import dataclasses

    if not isinstance(rule, SensitivityRule):
        rule = parse_sensitivity_rule(rule)
    if not rule.active:
        return plan, []
    packed = plan.packed_nbytes or get_format(plan.format).packed_nbytes
    cands = {d.name: d for d in plan.quantized() if d.name in per_layer_sqnr}
    errors = {n: float(per_layer_sqnr[n]) for n in cands}
    sizes = {
        n: d.out_features * d.in_features * dtype_bytes - packed(d.out_features, d.in_features)
        for n, d in cands.items()
    }
    kept = choose_sensitive_layers(
        errors,
        sizes,
        threshold_db=rule.threshold_db,
        keep_worst_fraction=rule.keep_worst_fraction,
        byte_budget=rule.byte_budget,
        base_bytes=plan.bytes_after(dtype_bytes) + other_bytes,
    )
    chosen = set(kept)
    decisions = [
        dataclasses.replace(
            d,
            quantize=False,
            source="sensitivity",
            reason=f"sensitive: weight SQNR {errors[d.name]:.1f} dB ({rule.describe()})",
            pattern=None,
            line=None,
        )
        if d.name in chosen
        else d
        for d in plan.decisions
    ]
    return dataclasses.replace(plan, decisions=decisions), kept
