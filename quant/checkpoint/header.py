"""The parsed header of a safetensors file (tensor entries, metadata), the format's limits and
dtypes, and how every checkpoint error is worded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CheckpointError

if TYPE_CHECKING:
    pass

# The format's own limit on the JSON header (safetensors `MAX_HEADER_SIZE`).
MAX_HEADER_BYTES = 100_000_000
_U64_MAX = 2**64 - 1

# The closed dtype list of safetensors 0.8 (`Dtype` in tensor.rs) -> bits per element.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

# safetensors dtype -> torch dtype attribute name (as `safetensors.torch` maps them). F4 is
# stored two codes per byte and becomes float4_e2m1fn_x2 with the last dimension halved.
_TORCH_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F4": "float4_e2m1fn_x2",
}

_READ_CHUNK = 64 << 20  # bytes per readinto call: bounded syscalls, no giant temporary


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of the header. `start`/`end` are byte offsets relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header. `tensors` is in file (offset) order."""

    path: str
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    header_len: int
    file_size: int

    @property
    def data_start(self) -> int:
        """Absolute file offset of the first data byte."""
        return 8 + self.header_len

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: e.shape for name, e in self.tensors.items()}

    def dtypes(self) -> dict[str, str]:
        return {name: e.dtype for name, e in self.tensors.items()}



# ---------------------------------------------------------------------------------------------
# errors


def _fail(path: str, reason: str, cls: type[CheckpointError] = CheckpointError) -> CheckpointError:
    return cls(f"{path}: {reason}", path=path, reason=reason)


def _short(text: str, limit: int = 120) -> str:
    """A tensor name or value for a message: repr'd (so control characters show) and bounded."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 5] + "...'"


