"""What every weight format is and the registry of formats.

A format is a registered `WeightFormat` object: everything format-specific lives on it
(`quantize`, `dequantize`, `packed_nbytes`, `unsupported_reason`, `kind`, `computes`,
`quantize_activation_values`). Other modules never branch on a format's name: they call
`get_format(name)` and use its fields and methods. A format module (fp8.py, mxfp4.py) defines its
class and calls `register_format` for each of its variants; adding a format is a new module plus
one import in `quant/formats/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnknownFormatError


@dataclass(frozen=True, eq=False)  # eq=False: identity semantics; comparing tensors has no single truth
class QuantizedWeight:
    """A quantized Linear weight: logical shape (N, K) = (out_features, in_features)."""

    format: str  # a key of FORMATS
    qdata: torch.Tensor  # fp8 [N, K] or uint8 codes [N, K//2]
    scale: torch.Tensor  # fp32 [N, 1] (fp8 channel) / [] (fp8 tensor) / uint8 E8M0 [N, K//32] (mxfp4)
    shape: tuple[int, int]  # logical (N, K)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def nbytes(self) -> int:
        """Bytes actually held (data + scales)."""
        return self.qdata.numel() * self.qdata.element_size() + self.scale.numel() * self.scale.element_size()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedWeight:
        """A copy on another device (a new object; the format and shape are unchanged)."""
        return QuantizedWeight(
            self.format,
            self.qdata.to(device, non_blocking=non_blocking),
            self.scale.to(device, non_blocking=non_blocking),
            self.shape,
        )

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return get_format(self.format).dequantize(self, dtype)


@dataclass(frozen=True)
class WeightFormat:
    """Base of a weight format. `kind` ("fp8" / "mxfp4") selects the torch.library op and backends;
    `computes` lists the compute modes a quantized_linear may run in, preferred first."""

    name: str
    bits_per_weight: float
    min_in_multiple: int
    kind: str
    computes: tuple[str, ...]
    description: str = ""
    # The name ComfyUI's own loader (`QUANT_ALGOS`, `_quantization_metadata`) gives this exact
    # storage, when it reads it as this format computes; "" when stock ComfyUI cannot read it.
    comfyui_name: str = ""

    def quantize(self, w: torch.Tensor, *, check_finite: bool = True) -> QuantizedWeight:
        """check_finite=False skips the NaN/Inf check (a device-to-host synchronisation): the
        caller asks `finite(qw)` instead and reads the answers together, once."""
        raise NotImplementedError

    def finite(self, qw: QuantizedWeight) -> torch.Tensor:
        """0-dim bool tensor on qw's device, no synchronisation: whether the weight qw was made
        from (with check_finite=False) held only finite values."""
        raise NotImplementedError

    def packed_finite(self, qw: QuantizedWeight) -> torch.Tensor:
        """0-dim bool tensor on qw's device, no synchronisation: whether packed bytes read from a
        file (not made here) decode to finite values: no NaN/Inf code in the data or the scale.
        Formats whose codes the dtype does not say (E8M0 scales stored as uint8) override it."""
        from ..checkpoint.reader import finite_flag

        return finite_flag(qw.qdata) & finite_flag(qw.scale)

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_unchunked(self, qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        """The whole weight in dtype as one expression, equal to `dequantize`, for graphs that a
        compiler fuses into one kernel. `dequantize` writes row chunks into one buffer to bound
        its fp32 temporaries; traced, each chunk becomes a slice_scatter, a pass over the whole
        buffer. Formats without one keep `dequantize`."""
        return self.dequantize(qw, dtype)

    def packed_nbytes(self, out_features: int, in_features: int) -> int:
        raise NotImplementedError

    def packed_layout(
        self, out_features: int, in_features: int
    ) -> tuple[tuple[tuple[int, ...], torch.dtype], tuple[tuple[int, ...], torch.dtype]]:
        """((data shape, data dtype), (scale shape, scale dtype)) of a packed [N, K] weight: what
        `quantize` returns, so a file's packed tensors can be checked before they are used."""
        raise NotImplementedError

    def dequantize_rows(self, qw: QuantizedWeight, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Output channels start:stop of the weight, dequantized to dtype (for chunked matmuls)."""
        raise NotImplementedError

    def dequantize_rows_unscaled(
        self, qw: QuantizedWeight, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows start:stop as fp32 plus the per-output-channel scale still to apply after the
        accumulation ([rows, 1], [] or None when already applied), as a scaled GEMM would."""
        return self.dequantize_rows(qw, start, stop, torch.float32), None

    def check_compute(self, compute: str) -> str:
        """`compute` if this format runs it ("auto" included), else a ValueError naming the modes."""
        if compute != "auto" and compute not in self.computes:
            raise ValueError(
                f"compute mode {compute!r} is not one of {('auto', *self.computes)} for {self.name}"
            )
        return compute

    def quantize_activation_values(
        self, x: torch.Tensor, bits: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Activations x [M, K] as the `w?a{bits}` compute modes of this format see them: the exact
        low-precision values in fp32, and the per-token scale still to apply after the fp32
        accumulation ([M, 1], or None when the values already carry it). The reference matmul
        calls this; each format says which activation precision pairs with it."""
        raise ValueError(f"{self.name} has no {bits}-bit activation mode (modes: {self.computes})")

    def unsupported_reason(self, out_features: int, in_features: int) -> str | None:
        """None when a Linear of this shape can be stored in this format, else why not."""
        if out_features <= 0 or in_features <= 0:
            return f"empty weight ({out_features}x{in_features})"
        if in_features % self.min_in_multiple:
            return (
                f"in_features {in_features} is not a multiple of {self.min_in_multiple} "
                f"(required by {self.name})"
            )
        return None

    def _check_weight(self, w: torch.Tensor) -> tuple[int, int]:
        if w.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
        n, k = w.shape
        reason = self.unsupported_reason(n, k)
        if reason:
            raise ValueError(f"{self.name} cannot store a {n}x{k} weight: {reason}")
        return n, k


FORMATS: dict[str, WeightFormat] = {}
ALIASES: dict[str, str] = {}


def register_format(fmt: WeightFormat, *aliases: str) -> WeightFormat:
    """Add a format (and names that resolve to it) to the registry; a name taken twice is a bug."""
    for name in (fmt.name, *aliases):
        if name in FORMATS or name in ALIASES:
            raise ValueError(f"format name {name!r} is registered twice")
    FORMATS[fmt.name] = fmt
    ALIASES.update(dict.fromkeys(aliases, fmt.name))
    return fmt


def get_format(name: str) -> WeightFormat:
    """The registered format named `name` (or an alias); UnknownFormatError lists the known ones."""
    key = ALIASES.get(name, name)
    try:
        return FORMATS[key]
    except (KeyError, TypeError):
        raise UnknownFormatError(name, sorted(FORMATS), sorted(ALIASES)) from None


def quantize_weight(w: torch.Tensor, format: str) -> QuantizedWeight:
    """Shorthand for get_format(format).quantize(w)."""
    return get_format(format).quantize(w)


__all__ = [
    "ALIASES",
    "FORMATS",
    "QuantizedWeight",
    "WeightFormat",
    "get_format",
    "quantize_weight",
    "register_format",
]
