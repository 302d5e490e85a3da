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
        tc = t[start : start + _CHUNK].float()
        signal += float(torch.sum(rc * rc))
        d = rc - tc
        noise += float(torch.sum(d * d))
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
            raise ValueError(
                f"keep_sensitive: cannot read {raw.strip()!r}; use 'none', 'worst 5%', "
                "'below 20 dB' or 'max 12 GB' (comma-separated to combine)"
            ) from None
    rule = SensitivityRule(**fields)
    if rule.keep_worst_fraction is not None and not 0.0 <= rule.keep_worst_fraction <= 1.0:
        raise ValueError(f"keep_sensitive: {text!r}: the percentage must be between 0 and 100")
    return rule
