"""Quality metrics: how far a quantized weight, layer output or image is from its reference.

All metrics accumulate in fp32 over bounded chunks (so a 5120x13824 bf16 weight never needs a
full fp32 copy) and sum the chunk totals in fp64. They run on whatever device the tensors are on.
Conventions: SQNR/PSNR are `inf` when the test tensor equals the reference exactly; SQNR is
`-inf` when the reference is all zeros but the test is not (no signal, some noise).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import SensitivityRuleError

# Elements per chunk: 4 Mi fp32 elements = 16 MiB of temporaries per operand.
_CHUNK = 1 << 22


def _check_pair(ref: Tensor, test: Tensor) -> None:
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs test {tuple(test.shape)}")


def _signal_and_noise(ref: Tensor, test: Tensor) -> tuple[float, float]:
    """Return (sum ref^2, sum (ref - test)^2), fp32 per chunk, fp64 across chunks."""
    _check_pair(ref, test)
    r = ref.detach().reshape(-1)
    t = test.detach().reshape(-1)
    if t.device != r.device:
        t = t.to(r.device)
    signal = 0.0
    noise = 0.0
    for start in range(0, r.numel(), _CHUNK):
        rc = r[start : start + _CHUNK].float()
        d = rc - t[start : start + _CHUNK].float()
        # dot products: one BLAS pass each, fp32 accumulation (no x*x temporaries)
        signal += float(torch.dot(rc, rc))
        noise += float(torch.dot(d, d))
    return signal, noise


def _sqnr_from(signal: float, noise: float) -> float:
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(ref: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10·log10(Σref² / Σ(ref−test)²), in dB.

    `inf` when `test` equals `ref`; `-inf` when `ref` is all zeros and `test` is not. Any dtype
    (bf16, fp16, fp8 upcast by the caller, fp32); accumulation is fp32 per chunk.
    """
    return _sqnr_from(*_signal_and_noise(ref, test))


def weight_sqnr_db(w: Tensor, dequantized: Tensor) -> float:
    """SQNR (dB) of a dequantized weight against the original weight (the loader's per-layer
    number). Same as `sqnr_db`, kept as its own name so the load report's meaning is explicit."""
    return sqnr_db(w, dequantized)


def relative_l2(ref: Tensor, test: Tensor) -> float:
    """‖ref − test‖₂ / ‖ref‖₂ (0.0 for exact, `inf` when ref is zero and test is not)."""
    signal, noise = _signal_and_noise(ref, test)
    if noise == 0.0:
        return 0.0
    if signal == 0.0:
        return math.inf
    return math.sqrt(noise / signal)


def channel_sqnr_db(ref: Tensor, test: Tensor) -> Tensor:
    """Per-row SQNR in dB (fp32, shape ref.shape[:-1]): for a weight [N, K], one number per output
    channel. The global SQNR is dominated by the largest rows; this shows the small rows that a
    per-tensor scale flushes to zero (the FP8 tensor-vs-channel question)."""
    _check_pair(ref, test)
    r = ref.detach().float()
    d = r - test.detach().to(r.device).float()
    signal = (r * r).sum(-1)
    noise = (d * d).sum(-1)
    out = 10.0 * torch.log10(signal / noise)
    out = torch.where(noise == 0, torch.full_like(out, math.inf), out)
    return torch.where((signal == 0) & (noise > 0), torch.full_like(out, -math.inf), out)


def mse(ref: Tensor, test: Tensor) -> float:
    """Mean squared error, fp32 per chunk."""
    _, noise = _signal_and_noise(ref, test)
    return noise / max(ref.numel(), 1)


def psnr_db(ref: Tensor, test: Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB for images/frames with values in [0, data_range]
    (ComfyUI IMAGE tensors are [B, H, W, C] in [0, 1]). `inf` when identical."""
    err = mse(ref, test)
    if err == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range * data_range / err)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma * sigma))
    return g / g.sum()


def ssim(
    ref: Tensor,
    test: Tensor,
    data_range: float = 1.0,
    *,
    channels_last: bool = True,
    window: int = 11,
    sigma: float = 1.5,
    batch_chunk: int = 8,
) -> float:
    """Mean structural similarity (Wang et al. 2004: Gaussian window 11, sigma 1.5,
    K1 = 0.01, K2 = 0.03, 'valid' filtering) over all images/frames and channels.

    `ref`/`test`: [B, H, W, C] (ComfyUI IMAGE, `channels_last=True`) or [B, C, H, W]; a 5-D video
    tensor [B, T, H, W, C] is flattened to frames. Frames are processed `batch_chunk` at a time in
    fp32 so a long video never needs all of its filtered maps at once. Images smaller than the
    window use a window as large as the smaller side.
    """
    _check_pair(ref, test)
    if ref.dim() == 5:  # video: fold time into the batch
        ref = ref.reshape(-1, *ref.shape[-3:])
        test = test.reshape(-1, *test.shape[-3:])
    if ref.dim() == 3:
        ref, test = ref.unsqueeze(0), test.unsqueeze(0)
    if ref.dim() != 4:
        raise ValueError(f"ssim expects [B,H,W,C] or [B,C,H,W] images, got shape {tuple(ref.shape)}")
    if channels_last:
        ref, test = ref.movedim(-1, 1), test.movedim(-1, 1)
    _, c, h, w = ref.shape
    size = min(window, h, w)
    g = _gaussian_window(size, sigma, ref.device)
    kx = g.view(1, 1, 1, size).expand(c, 1, 1, size)
    ky = g.view(1, 1, size, 1).expand(c, 1, size, 1)

    def blur(x: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, kx, groups=c), ky, groups=c)

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    total = 0.0
    count = 0
    for start in range(0, ref.shape[0], batch_chunk):
        x = ref[start : start + batch_chunk].float()
        y = test[start : start + batch_chunk].to(x.device).float()
        mu_x, mu_y = blur(x), blur(y)
        sxx = blur(x * x) - mu_x * mu_x
        syy = blur(y * y) - mu_y * mu_y
        sxy = blur(x * y) - mu_x * mu_y
        num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
        den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
        smap = num / den
        total += float(smap.double().sum())
        count += smap.numel()
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# Sensitivity: which layers to keep in bf16, from measured per-layer error
# ---------------------------------------------------------------------------------------------


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


def sample_rows(n: int, rows: int | None) -> Tensor | None:
    """Evenly spaced row indices (None = all rows: `rows` is None or >= n)."""
    if rows is None or rows >= n:
        return None
    return torch.linspace(0, n - 1, max(rows, 1)).round().long()


def quantized_weight_sqnr_db(w: Tensor, qw, rows: int | None = 256) -> float:
    """Weight SQNR (dB) of a `formats.QuantizedWeight` against the weight [N, K] it was made from:
    the load report's per-layer number.

    Every format here is row-local (per-channel or per-tensor FP8 scales, MXFP4 blocks along K),
    so the error of a row does not depend on the other rows: with `rows` set, only that many
    evenly spaced rows are dequantized and compared, which makes the measurement cost
    rows/N of a full one (on CPU a full dequantize + compare costs about as much as the
    quantization itself). `rows=None` measures every row."""
    from .formats import QuantizedWeight

    idx = sample_rows(w.shape[0], rows)
    if idx is None:
        return sqnr_db(w, qw.dequantize(torch.float32))
    idx = idx.to(qw.qdata.device)
    per_row = qw.scale.dim() > 0 and qw.scale.shape[0] == w.shape[0]
    scale = qw.scale.index_select(0, idx) if per_row else qw.scale  # a per-tensor scale stays
    part = QuantizedWeight(qw.format, qw.qdata.index_select(0, idx), scale, (int(idx.numel()), qw.shape[1]))
    return sqnr_db(w.index_select(0, idx.to(w.device)), part.dequantize(torch.float32))


def estimate_weight_sqnr_db(w: Tensor, format: str, rows: int | None = 256) -> float:
    """SQNR (dB) that quantizing `w` [N, K] with `format` would give, from `rows` evenly spaced rows
    only (quantized together with the row holding the tensor's amax, so a per-tensor scale is the
    full tensor's). Exact per row for every format here (they are row-local); `rows=None`
    quantizes the whole weight. Costs about rows/N of a real quantization."""
    from .formats import get_format

    fmt = get_format(format)
    idx = sample_rows(w.shape[0], rows)
    if idx is None:
        return quantized_weight_sqnr_db(w, fmt.quantize(w), rows=None)
    idx = idx.to(w.device)
    amax_row = w.abs().amax(dim=1).argmax().reshape(1)
    part = w.index_select(0, torch.cat([idx, amax_row]))
    deq = fmt.quantize(part).dequantize(torch.float32)[:-1]
    return sqnr_db(part[:-1], deq)


def measure_weight_sqnr(
    tensors, plan, *, device: torch.device | str | None = None, rows: int | None = 256
) -> dict[str, float]:
    """Stream `(state-dict key, tensor)` pairs (a loaded state dict's `.items()`, or
    `safetensors_header.iter_tensors(path)`), and return name -> estimated SQNR (dB) for every
    weight the plan quantizes, with the plan's format (`estimate_weight_sqnr_db`).

    This is the pre-pass that global sensitivity rules ("worst 5%", "max 12 GB") need before
    the real load; with `rows` sampling it costs a few % of the load."""
    from .patterns import strip_prefix

    out: dict[str, float] = {}
    for key, t in tensors:
        if not key.endswith(".weight") or getattr(t, "dim", lambda: 0)() != 2:
            continue
        name = strip_prefix(key[: -len(".weight")])
        d = plan.decision(name)
        if d is None or not d.quantize:
            continue
        if hasattr(t, "materialize"):  # a lazily read tensor (safetensors_header.lazy_state_dict): read once
            t = t.materialize()
        if device is not None:
            t = t.to(device)
        out[name] = estimate_weight_sqnr_db(t, plan.format, rows)
    return out


def other_param_bytes(shapes: Mapping[str, Sequence[int]], plan, dtype_bytes: int = 2) -> int:
    """Bytes of the parameters that are not Linear weights of the plan (biases, norms, embeddings,
    convolutions), at `dtype_bytes` per value: what a byte budget must count besides the plan."""
    from .patterns import strip_prefix

    total = 0
    for key, shape in shapes.items():
        if key.endswith(".weight") and plan.decision(strip_prefix(key[: -len(".weight")])) is not None:
            continue
        total += math.prod(shape) * dtype_bytes
    return total


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
    plan, per_layer_sqnr: Mapping[str, float], rule: SensitivityRule | str | None, *, other_bytes: int = 0,
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
    from .formats import get_format

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


# ---------------------------------------------------------------------------------------------
# Fake quantization (quantize then dequantize, fp32) through the formats' own reference code
# ---------------------------------------------------------------------------------------------

#: Weight variants the bench and the activation statistics compare.
WEIGHT_VARIANTS = ("fp8_channel", "fp8_tensor", "mxfp4_even", "mxfp4_floor", "mxfp4_ceil")


def fake_quantize_weight(w: Tensor, variant: str) -> Tensor:
    """Quantize-dequantize a [N, K] weight with one of WEIGHT_VARIANTS; returns fp32."""
    from . import fp8, mxfp4  # A's modules; imported late so the metrics work on their own

    w = w.float()
    if variant.startswith("fp8_"):
        q, s = fp8.quantize_weight(w, granularity=variant[4:])
        return fp8.dequantize(q, s, torch.float32)
    if variant.startswith("mxfp4_"):
        codes, scales = mxfp4.quantize(w, rounding=variant[6:])
        return mxfp4.dequantize(codes, scales, torch.float32)
    raise ValueError(f"unknown weight variant {variant!r}; known: {', '.join(WEIGHT_VARIANTS)}")


def fake_quantize_activation(x: Tensor, bits: int) -> Tensor:
    """Quantize-dequantize activations [..., K] as the W8A8 / W4A4 paths do: 8 = FP8 e4m3 with a
    dynamic per-token scale; 4 = MXFP4 with AITER's `dynamic_mxfp4_quant` rounding ("even")."""
    from . import fp8, mxfp4

    x = x.float()
    if bits == 8:
        q, s = fp8.quantize_activation(x)
        return q.float() * s
    if bits == 4:
        codes, scales = mxfp4.quantize(x, rounding="even")
        return mxfp4.dequantize(codes, scales, torch.float32)
    raise ValueError(f"activation bits must be 8 or 4, got {bits}")


# ---------------------------------------------------------------------------------------------
# Activation statistics on the first forward
# ---------------------------------------------------------------------------------------------

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
