"""Full-size safetensors files that cost no disk: a real header followed by a sparse (all-zero,
unallocated) data section. The web preview reads only the header, so a 28 GB Wan 14B "file" is
a valid test input that takes a few hundred KB of disk. No weights are downloaded or made.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}


def write_sparse_safetensors(
    path: Path, shapes: Mapping[str, Sequence[int]], dtype: str = "BF16", pad_header_to: int = 0
) -> Path:
    """Write a valid safetensors file with `shapes` (zeros, sparse). Returns `path`."""
    header: dict = {}
    offset = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    if pad_header_to > len(raw):
        raw += b" " * (pad_header_to - len(raw))  # trailing whitespace is allowed by the format
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)  # sparse: the data section is never written
    return path
