"""What one online-quantized load did: the plan, the bytes, the time, the backend, the warnings.

The loader fills a `LoadReport`; the loader node shows `to_text()` and returns it as its STRING
output; the web preview and tests read `to_dict()`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from ..quant.selection.plan import format_bytes


@dataclass
class LayerRecord:
    """One Linear layer as it was loaded."""

    name: str
    out_features: int
    in_features: int
    quantized: bool
    reason: str
    source: str
    bytes_before: int  # bytes the weight had in the file's dtype
    bytes_after: int  # bytes it holds now (packed data + scales when quantized)
    sqnr_db: float | None = None  # weight SQNR of the quantized weight vs the original, when measured
    compute: str = ""  # the quantized layer's compute mode ("auto", or e.g. "w8a16" for weights only)


@dataclass
class LoadReport:
    """Summary of one `load_quantized` call."""

    model_file: str
    format: str
    family: str
    compute_dtype: str = ""
    layers: list[LayerRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    backend: str = ""
    backend_reason: str = ""
    backends_skipped: tuple[tuple[str, str], ...] = ()  # (backend, why not), ranked above the chosen one
    quantize_device: str = ""
    load_seconds: float = 0.0
    quantize_seconds: float = 0.0
    plan_summary: str = ""

    # ---- derived numbers -------------------------------------------------------------------
    def quantized(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.quantized]

    def kept(self) -> list[LayerRecord]:
        return [r for r in self.layers if not r.quantized]

    def linear_bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    def linear_bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    def counts_by_reason(self) -> dict[str, int]:
        """Kept layers counted by the source of the decision ("pattern", "size", "format", ...)."""
        c = collections.Counter(r.source for r in self.kept())
        return dict(sorted(c.items()))

    def sqnr_summary(self) -> dict[str, float] | None:
        vals = [r.sqnr_db for r in self.quantized() if r.sqnr_db is not None]
        if not vals:
            return None
        return {"min_db": min(vals), "mean_db": sum(vals) / len(vals), "layers": len(vals)}

    # ---- output ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "model_file": self.model_file,
            "format": self.format,
            "family": self.family,
            "compute_dtype": self.compute_dtype,
            "backend": {
                "name": self.backend,
                "reason": self.backend_reason,
                "not_chosen": [{"backend": b, "why": why} for b, why in self.backends_skipped],
            },
            "quantize_device": self.quantize_device,
            "load_seconds": round(self.load_seconds, 3),
            "quantize_seconds": round(self.quantize_seconds, 3),
            "layers_quantized": len(self.quantized()),
            "layers_kept": len(self.kept()),
            "kept_by_reason": self.counts_by_reason(),
            "linear_bytes_before": self.linear_bytes_before(),
            "linear_bytes_after": self.linear_bytes_after(),
            "sqnr": self.sqnr_summary(),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "layers": [
                {
                    "name": r.name,
                    "shape": [r.out_features, r.in_features],
                    "quantized": r.quantized,
                    "reason": r.reason,
                    "source": r.source,
                    "bytes_before": r.bytes_before,
                    "bytes_after": r.bytes_after,
                    "sqnr_db": None if r.sqnr_db is None else round(r.sqnr_db, 2),
                    "compute": r.compute,
                }
                for r in self.layers
            ],
        }

    def to_text(self, max_kept: int = 40) -> str:
        before, after = self.linear_bytes_before(), self.linear_bytes_after()
        n_wo = sum(r.compute.endswith("a16") for r in self.quantized())
        ratio = (after / before * 100.0) if before else 100.0
        lines = [
            f"OnlineQuant: {self.model_file}",
            f"family: {self.family}   format: {self.format}   compute dtype: {self.compute_dtype}",
            f"backend: {self.backend or 'n/a'}"
            + (f" ({self.backend_reason})" if self.backend_reason else ""),
            f"Linear layers: {len(self.quantized())} quantized, {len(self.kept())} kept"
            + (f" ({n_wo} of them weights only, activations in {self.compute_dtype})" if n_wo else ""),
            f"Linear weights: {format_bytes(before)} -> {format_bytes(after)} ({ratio:.1f}%)",
            f"load time: {self.load_seconds:.2f} s (quantization {self.quantize_seconds:.2f} s"
            + (f" on {self.quantize_device})" if self.quantize_device else ")"),
        ]
        sq = self.sqnr_summary()
        if sq:
            lines.append(
                f"weight SQNR: min {sq['min_db']:.1f} dB, mean {sq['mean_db']:.1f} dB"
                f" over {sq['layers']} layers"
            )
            # the worst quantized layers by weight SQNR, as lines the ignored-layers field accepts
            worst = sorted((r for r in self.quantized() if r.sqnr_db is not None), key=lambda r: r.sqnr_db)
            lines.append("lowest weight SQNR (copy a line into ignored_layers to keep that layer):")
            lines.extend(f"  {r.name}  # {r.sqnr_db:.1f} dB" for r in worst[:5])
        kept = self.kept()
        if kept:
            by = ", ".join(f"{k}: {v}" for k, v in self.counts_by_reason().items())
            lines.append(f"kept in high precision ({by}):")
            groups: dict[str, list[str]] = {}
            for r in kept:  # one line per reason, the layers that share it compacted
                groups.setdefault(r.reason, []).append(r.name)
            for reason, names in list(groups.items())[:max_kept]:
                shown = ", ".join(names[:4]) + (f", ... ({len(names)} layers)" if len(names) > 4 else "")
                lines.append(f"  {shown}: {reason}")
        for w in self.warnings:
            lines.append(f"WARNING: {w}")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)
