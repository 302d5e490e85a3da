"""Reading checkpoint files users have: a strict safetensors reader (header rules, positioned reads,
a lazy state dict), what a file that is not safetensors looks like, and whether a file is already
quantized, the pack's own file of a quantized model (packed_file) and the quantized load cache
built on it (load_cache). Imports go one way: header -> rules / sniff -> reader -> lazy;
header -> packed_file -> classify, load_cache."""

from .classify import CheckpointKind, classify_checkpoint
from .header import DTYPE_BITS, MAX_HEADER_BYTES, SafetensorsHeader, TensorEntry
from .lazy import lazy_state_dict
from .packed_file import PackedFileInfo, is_packed_file, read_packed_info
from .reader import iter_tensors, read_header, read_header_bytes, torch_dtype

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_BYTES",
    "CheckpointKind",
    "PackedFileInfo",
    "SafetensorsHeader",
    "TensorEntry",
    "classify_checkpoint",
    "is_packed_file",
    "iter_tensors",
    "lazy_state_dict",
    "read_header",
    "read_header_bytes",
    "read_packed_info",
    "torch_dtype",
]
