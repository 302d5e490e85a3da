"""Reading checkpoint files users have: a strict safetensors reader (header rules, positioned reads,
a lazy state dict), what a file that is not safetensors looks like, and whether a file is already
quantized. Imports go one way: header -> rules / sniff -> reader -> lazy; header -> classify."""

from .classify import CheckpointKind, classify_checkpoint
from .header import DTYPE_BITS, MAX_HEADER_BYTES, SafetensorsHeader, TensorEntry
from .lazy import lazy_state_dict
from .reader import iter_tensors, read_header, read_header_bytes, torch_dtype

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_BYTES",
    "CheckpointKind",
    "SafetensorsHeader",
    "TensorEntry",
    "classify_checkpoint",
    "iter_tensors",
    "lazy_state_dict",
    "read_header",
    "read_header_bytes",
    "torch_dtype",
]
