"""Activation statistics of every Linear on a model's first forward (forward pre-hooks): per
input channel max, kurtosis, and the W8A8 / W4A4 output error of the layer on the input it saw.
Outlier channels are what break activation quantization (MXFP4 blocks of 32 most of all)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .fake_quant import fake_quantize_activation, fake_quantize_weight
from .metrics import sqnr_db

#: Output-error schemes measured per layer: name -> (weight variant or None, activation bits or None)
ACTIVATION_SCHEMES = {
    "w8a8": ("fp8_channel", 8),
    "w4a4": ("mxfp4_even", 4),
    "a8": (None, 8),  # activation error alone (bf16 weight)
    "a4": (None, 4),
}


@dataclass
class ActivationStats:
    """What one Linear saw on its first call."""

    name: str
    out_features: int
    in_features: int
    tokens: int  # rows of the input (all of them; errors use at most `max_tokens` of them)
    amax: float
    channel_amax: Tensor  # [in_features] fp32 on CPU: max |x| per input channel
    kurtosis: float  # Pearson kurtosis of all input values (3 for a Gaussian)
    outlier_ratio: float  # max channel amax / median channel amax
    output_sqnr_db: dict[str, float]  # scheme -> SQNR of the layer output vs bf16/fp32, on this input

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": [self.out_features, self.in_features],
            "tokens": self.tokens,
            "amax": self.amax,
            "kurtosis": round(self.kurtosis, 3),
            "outlier_ratio": round(self.outlier_ratio, 3),
            "top_channels": [int(i) for i in torch.topk(self.channel_amax, min(4, self.in_features)).indices],
            "output_sqnr_db": {k: round(v, 2) for k, v in self.output_sqnr_db.items()},
        }


def layer_activation_stats(
    name: str, x: Tensor, weight: Tensor, *, schemes: Sequence[str] = ("w8a8", "w4a4"), max_tokens: int = 512
) -> ActivationStats:
    """Statistics of input `x` [..., K] of a Linear with weight [N, K], and the output SQNR of
    each scheme in ACTIVATION_SCHEMES on (an even subsample of at most `max_tokens` rows of) it."""
    k = x.shape[-1]
    flat = x.detach().reshape(-1, k)
    absx = flat.abs()
    channel_amax = absx.amax(dim=0).float().cpu() if flat.shape[0] else torch.zeros(k)
    rows = flat.shape[0]
    if rows > max_tokens:
        idx = torch.linspace(0, rows - 1, max_tokens, device=flat.device).round().long()
        xs = flat.index_select(0, idx).float()
    else:
        xs = flat.float()
    mean = xs.mean()
    var = xs.var(unbiased=False)
    kurt = float(((xs - mean) ** 4).mean() / (var * var)) if float(var) > 0 else math.nan
    med = float(channel_amax.median()) if k else 0.0
    w = weight.detach()
    if type(w) not in (Tensor, torch.nn.Parameter) and hasattr(w, "dequantize"):
        w = w.dequantize()  # a packed tensor subclass (comfy-kitchen QuantizedTensor and friends)
    w = w.to(xs.device).float()
    ref = xs @ w.t()
    errs: dict[str, float] = {}
    for scheme in schemes:
        variant, bits = ACTIVATION_SCHEMES[scheme]
        if ((variant or "").startswith("mxfp4") or bits == 4) and k % 32:
            continue  # MXFP4 needs K % 32 == 0: not measurable, not quantizable either
        wq = fake_quantize_weight(w, variant) if variant else w
        xq = fake_quantize_activation(xs, bits) if bits else xs
        errs[scheme] = sqnr_db(ref, xq @ wq.t())
    return ActivationStats(
        name=name,
        out_features=w.shape[0],
        in_features=k,
        tokens=rows,
        amax=float(channel_amax.max()) if k else 0.0,
        channel_amax=channel_amax,
        kurtosis=kurt,
        outlier_ratio=float(channel_amax.max()) / med if med > 0 else math.inf,
        output_sqnr_db=errs,
    )


class ActivationStatsCollector:
    """Forward pre-hooks on every `nn.Linear` of `model` that record `layer_activation_stats` on
    the layer's FIRST call only, then stay idle (a sampling run of 20 steps pays once).

        with ActivationStatsCollector(model) as col:
            model(x)
        print(col.table())

    Cost: per Linear, one extra matmul of `max_tokens` rows per scheme plus one quantization of
    its weight per weight variant, on the layer's device, during that first call only.
    `names` restricts the hooks to those layer names; `prefix` is stripped from reported names.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        schemes: Sequence[str] = ("w8a8", "w4a4"),
        max_tokens: int = 512,
        names: Sequence[str] | None = None,
        prefix: str = "",
    ) -> None:
        unknown = [s for s in schemes if s not in ACTIVATION_SCHEMES]
        if unknown:
            raise ValueError(f"unknown schemes {unknown}; known: {', '.join(ACTIVATION_SCHEMES)}")
        self.model = model
        self.schemes = tuple(schemes)
        self.max_tokens = max_tokens
        self.names = set(names) if names is not None else None
        self.prefix = prefix
        self.stats: dict[str, ActivationStats] = {}
        self.errors: dict[str, str] = {}
        self._handles: list = []

    def __enter__(self) -> ActivationStatsCollector:
        for full, mod in self.model.named_modules():
            name = full[len(self.prefix) :] if self.prefix and full.startswith(self.prefix) else full
            if not isinstance(mod, torch.nn.Linear) or (self.names is not None and name not in self.names):
                continue
            self._handles.append(mod.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if name in self.stats or name in self.errors or not args or not isinstance(args[0], Tensor):
                return
            try:
                with torch.no_grad():
                    self.stats[name] = layer_activation_stats(
                        name, args[0], module.weight, schemes=self.schemes, max_tokens=self.max_tokens
                    )
            except Exception as e:  # statistics must never break the user's forward pass
                self.errors[name] = f"{type(e).__name__}: {e}"

        return hook

    def worst(self, scheme: str = "w8a8", n: int = 10) -> list[ActivationStats]:
        """The n layers with the lowest output SQNR under `scheme`."""
        have = [s for s in self.stats.values() if scheme in s.output_sqnr_db]
        return sorted(have, key=lambda s: (s.output_sqnr_db[scheme], s.name))[:n]

    def table(self, n: int = 10) -> str:
        """Plain-text table of the worst layers per scheme (the compare node's UI text)."""
        lines = [f"activation statistics: {len(self.stats)} Linear layers observed"]
        for scheme in self.schemes:
            worst = self.worst(scheme, n)
            if not worst:
                continue
            lines.append(f"worst {len(worst)} layers for {scheme} (SQNR | kurtosis | max/median amax):")
            for s in worst:
                sq = s.output_sqnr_db[scheme]
                lines.append(f"  {s.name}: {sq:.1f} dB | {s.kurtosis:.1f} | {s.outlier_ratio:.1f}x")
        for name, err in sorted(self.errors.items()):
            lines.append(f"  (not measured) {name}: {err}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "layers": [s.to_dict() for s in self.stats.values()],
            "errors": dict(self.errors),
        }
