"""The pack's own exception types. Every user-facing failure is one of these, with a message
that names the layer, pattern, file or node at fault."""

from __future__ import annotations


class OnlineQuantError(Exception):
    """Base class of every error this pack raises on purpose."""


class PatternError(OnlineQuantError, ValueError):
    """An ignored-layers pattern is invalid (bad regex, partial ignore of a fused layer, ...)."""


class CheckpointError(OnlineQuantError, ValueError):
    """A checkpoint file is unreadable, malformed, or does not fit the architecture.

    `path` is the file and `reason` the message without it (for a web route that must not echo
    server paths); both None when the error is not about one file."""

    def __init__(self, message: str, *, path: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason if reason is not None else message


class NonFiniteWeightError(OnlineQuantError, ValueError):
    """A weight contains NaN or Inf and cannot be quantized."""


class BackendUnavailableError(OnlineQuantError, RuntimeError):
    """A backend that was asked for explicitly (Triton, AITER, flash-attn, ...) is not installed
    or cannot run on this device. The message names the package to install."""


class QuantizationOOMError(OnlineQuantError, RuntimeError):
    """Ran out of memory while quantizing a layer; the message names the layer and the size."""


class HeaderTooLargeError(CheckpointError):
    """A safetensors header is larger than the cap the caller set (`read_header(max_header_bytes=...)`).
    The web preview answers HTTP 413 for it; loading a model uses the format's own 100 MB limit."""


class PackedWeightError(OnlineQuantError, RuntimeError):
    """Code asked for a quantized weight's memory as plain values of its logical dtype and shape
    (safetensors' `save_file` does, through `data_ptr()`): that memory holds packed data, so the
    weight must be dequantized first. The message names the format and the shapes."""


class AttentionUnsupportedError(OnlineQuantError, ValueError):
    """The FP8 attention kernel can't take this call (mask, dtype, head dim, device...); the
    message says why. Callers fall back to their own attention function."""


class SensitivityRuleError(OnlineQuantError, ValueError):
    """The loader's `keep_sensitive` text can't be read ('worst 5%', 'below 20 dB', 'max 12 GB');
    the message quotes the part at fault and the accepted forms."""


class UnknownFormatError(OnlineQuantError, ValueError):
    """A quantization format name that is not registered; `known` lists the registered names."""

    def __init__(self, name: object, known: list[str], aliases: list[str]) -> None:
        self.name, self.known, self.aliases = name, tuple(known), tuple(aliases)
        super().__init__(
            f"unknown quantization format {name!r}; known formats: {', '.join(known)}; "
            f"aliases: {', '.join(aliases)}"
        )


class UsageError(OnlineQuantError, ValueError):
    """A mistake in a command line or its inputs: the CLI prints it without a traceback, exit 2."""
