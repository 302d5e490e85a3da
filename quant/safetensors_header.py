"""A strict reader for untrusted `.safetensors` files: the header without the data, and tensors
one at a time by positioned reads.

Every rule the format itself enforces (huggingface/safetensors `tensor.rs`, DESIGN.md §8) is
checked here, so a file this module accepts is one the safetensors library accepts too, with one
documented difference: **duplicate keys are rejected** (the spec forbids them; the library keeps
the last one, so which tensor gets loaded would depend on the parser).

Why not `safetensors.safe_open`: its default backend mmaps the file, and a file truncated while it
is being read then kills the whole ComfyUI process with SIGBUS; its error texts also changed in
0.6. Here data is read with `seek` + `readinto` into memory we own, so a short read is a normal
`CheckpointError`, and nothing is matched on any library's message text.

Every failure is a `CheckpointError` (`HeaderTooLargeError` above a caller's cap) whose message
starts with the file name, says what is wrong and, where it helps, what to do. The exception also
carries `.path` and `.reason` (the message without the path), e.g. for a web route that must not
echo server paths.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import CheckpointError, HeaderTooLargeError

if TYPE_CHECKING:
    import torch

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
    err = cls(f"{path}: {reason}")
    err.path = path  # type: ignore[attr-defined]
    err.reason = reason  # type: ignore[attr-defined]
    return err


def _short(text: str, limit: int = 120) -> str:
    """A tensor name or value for a message: repr'd (so control characters show) and bounded."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 5] + "...'"


# ---------------------------------------------------------------------------------------------
# what a file that is not safetensors looks like (asked only after the format checks failed, so a
# valid file is never misnamed)

_SNIFF_BYTES = 1024


def _sniff(head: bytes) -> str | None:
    stripped = head.lstrip(b" \t\r\n\xef\xbb\xbf")
    lower = stripped[:256].lower()
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        return (
            "is a Git LFS pointer file, not the model weights (the real file was never downloaded): "
            "run `git lfs pull` in the repository it came from, or download the file itself"
        )
    if lower.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or (
        lower.startswith(b"<") and b"<html" in head.lower()
    ):
        return (
            "is an HTML page (an error or login page was saved instead of the model): download the "
            "file again (on Hugging Face use the file's download link, not its web page)"
        )
    if head.startswith(b"GGUF"):
        return (
            "is a GGUF file renamed to .safetensors: load it with a GGUF loader (e.g. ComfyUI-GGUF); "
            "this loader quantizes ordinary bf16/fp16 .safetensors files"
        )
    # Pickle: PROTO opcode 0x80, protocol 2-5, then an opcode (never 0x00). A safetensors length
    # field of 0x0280-0x05ff bytes would also start 80 0x, but its third byte is 0.
    if head.startswith(b"PK\x03\x04") or (
        len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2] != 0
    ):
        return (
            "is a PyTorch pickle checkpoint (.ckpt/.pt/.bin) renamed to .safetensors; this pack never "
            "unpickles files (unpickling can run code): use the model's .safetensors release, or "
            "convert it with a tool you trust"
        )
    if stripped.startswith((b"{", b"[")):
        return (
            "is a JSON text file, not a safetensors file (a safetensors file starts with an 8-byte "
            "header length): check that you picked the model file, not its config"
        )
    return None


# ---------------------------------------------------------------------------------------------
# JSON with the format's number rules


class _BadNumber:
    """A JSON number where the format wants an unsigned 64-bit integer (kept as text for messages)."""

    __slots__ = ("text", "why")

    def __init__(self, text: str, why: str):
        self.text = text if len(text) <= 40 else text[:37] + "..."
        self.why = why

    def __repr__(self) -> str:
        return self.text


_objects_parsed = itertools.count()


class _HeaderJSONError(ValueError):
    pass


def _check_finite(text: str) -> None:
    # The format's JSON parser (serde_json) reads a number that fits no 64-bit integer as an f64
    # and rejects the header when that overflows, even in a field nobody reads (found by
    # quant/fuzz.py). 400+ digits always overflow; float() of shorter text is cheap.
    digits = len(text.lstrip("-").split("e")[0].split("E")[0].split(".")[0])
    if digits > 400 or float(text) in (float("inf"), float("-inf")):
        shown = text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
        raise _HeaderJSONError(f"number {shown} is out of range")


def _parse_int(text: str) -> int | _BadNumber:
    # Checked before int(): a 90 MB digit string must not be converted (and Python caps int()
    # of long strings anyway).
    if len(text) > 20:
        _check_finite(text)
    if text.startswith("-"):
        return _BadNumber(text, "negative")
    if len(text) > 20 or int(text) > _U64_MAX:
        return _BadNumber(text, "larger than 2^64-1")
    return int(text)


def _parse_float(text: str) -> _BadNumber:
    _check_finite(text)
    return _BadNumber(text, "not an integer")


def _parse_constant(text: str) -> None:
    raise _HeaderJSONError(f"{text} is not valid JSON")


def _object_pairs(pairs: list[tuple[str, object]]) -> dict:
    if next(_objects_parsed) % 64 == 0:
        # The C JSON scanner keeps the GIL through a whole header; a 8 MB header parsed in a
        # worker thread froze ComfyUI's event loop for ~1 s. Yielding every 64 objects
        # bounds that to a few ms (measured in tests/test_bad_inputs.py).
        time.sleep(0)
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _HeaderJSONError(
                    f"key {_short(key)} appears twice; the safetensors format forbids duplicate keys "
                    "(the safetensors library silently keeps the last one, so which tensor is loaded "
                    "would be ambiguous): re-save the file with a tool that writes each key once"
                )
            seen.add(key)
    return out


def _decode_json(path: str, raw: bytes) -> object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"header is not valid UTF-8 (byte {e.start + 8} of the file)") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_object_pairs,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except _HeaderJSONError as e:
        raise _fail(path, f"header is not valid safetensors JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise _fail(path, f"header is not valid JSON ({e.msg} at character {e.pos})") from None
    except RecursionError:
        raise _fail(path, "header JSON is nested too deeply (a safetensors header nests 3 levels)") from None


def _check_str(path: str, what: str, s: str) -> None:
    # Python's json accepts lone UTF-16 surrogates in \u escapes; the format (serde_json) does not.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(path, f"{what} {_short(s)} contains an invalid \\u escape (a lone surrogate)") from None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj: object) -> str | None:
    """The first string (key or value, at any depth) holding a lone UTF-16 surrogate, else None.
    serde_json rejects those anywhere in the header, even in fields nobody reads."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return x
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return None


def _u64(v: object) -> bool:
    return type(v) is int  # bool is an int subclass: excluded on purpose; _BadNumber is not int


def _json_type(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, _BadNumber)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _describe_bad(v: object) -> str:
    if isinstance(v, _BadNumber):
        return f"{v.text} ({v.why})"
    if isinstance(v, bool):
        return f"{str(v).lower()} (a boolean)"
    text = json.dumps(v, default=repr, ensure_ascii=True)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({_json_type(v)})"


def _parse_entries(path: str, obj: object) -> tuple[list[TensorEntry], dict[str, str]]:
    if not isinstance(obj, dict):
        raise _fail(path, f"header is a JSON {_json_type(obj)}, not an object mapping tensor names")
    metadata: dict[str, str] = {}
    entries: list[TensorEntry] = []
    for name, info in obj.items():
        if name == "__metadata__":
            _check_str(path, "key", name)
            metadata = _metadata_from(path, info)
        else:
            entries.append(_entry_from(path, name, info))
    return entries, metadata


def _metadata_from(path: str, info: object) -> dict[str, str]:
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise _fail(path, "__metadata__ must map strings to strings, got " + _describe_bad(info))
    for k, v in info.items():
        _check_str(path, "__metadata__ key", k)
        if not isinstance(v, str):
            raise _fail(path, f"__metadata__ value of {_short(k)} must be a string, got {_describe_bad(v)}")
        _check_str(path, f"__metadata__ value of {_short(k)}:", v)
    return dict(info)


def _entry_from(path: str, name: str, info: object) -> TensorEntry:
    _check_str(path, "key", name)
    tname = _short(name)
    if not isinstance(info, dict):
        raise _fail(path, f"tensor {tname}: entry must be an object, got {_describe_bad(info)}")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise _fail(path, f"tensor {tname}: missing field {field!r}")
    dtype = info["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        shown = _short(dtype) if isinstance(dtype, str) else _describe_bad(dtype)
        raise _fail(path, f"tensor {tname}: unknown dtype {shown} (known: {', '.join(DTYPE_BITS)})")
    shape = info["shape"]
    if not isinstance(shape, list):
        raise _fail(path, f"tensor {tname}: shape must be a list of integers, got {_describe_bad(shape)}")
    for d in shape:
        if not _u64(d):
            raise _fail(
                path, f"tensor {tname}: shape {_describe_shape(shape)} has a dimension that is not "
                f"a non-negative integer: {_describe_bad(d)}"
            )
    offsets = info["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_u64(o) for o in offsets):
        raise _fail(
            path, f"tensor {tname}: data_offsets must be two non-negative integers [start, end], "
            f"got {_describe_shape(offsets) if isinstance(offsets, list) else _describe_bad(offsets)}"
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace, as the json module defines it
_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_pairs,
    parse_int=_parse_int,
    parse_float=_parse_float,
    parse_constant=_parse_constant,
)


def _stream_entries(path: str, text: str) -> tuple[list[TensorEntry], dict[str, str]] | None:
    """Fast path for valid headers: decode the top-level object one entry at a time and turn each
    into a TensorEntry at once, so a 70,000-tensor header leaves ~2 objects per tensor instead of
    ~7 for the garbage collector (its full collections, not the parse, froze ComfyUI's event loop
    for 0.2-1 s), and yield the GIL every 64 entries. Returns None at the first irregularity of
    any kind; the caller then parses the whole text with json.loads, which gives the precise error.
    """
    end = len(text)
    i = _WS.match(text, 0).end()
    if i >= end or text[i] != "{":
        return None
    i = _WS.match(text, i + 1).end()
    entries: list[TensorEntry] = []
    metadata: dict[str, str] = {}
    seen: set[str] = set()
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    try:
        if i < end and text[i] == "}":
            i += 1
        else:
            while True:
                if i >= end or text[i] != '"':
                    return None
                name, i = json.decoder.scanstring(text, i + 1, True)
                i = _WS.match(text, i).end()
                if i >= end or text[i] != ":":
                    return None
                i = _WS.match(text, i + 1).end()
                info, i = _DECODER.raw_decode(text, i)
                if name in seen or (surrogates and _lone_surrogate([name, info]) is not None):
                    return None
                seen.add(name)
                if name == "__metadata__":
                    metadata = _metadata_from(path, info)
                else:
                    entries.append(_entry_from(path, name, info))
                    if len(entries) % 64 == 0:
                        time.sleep(0)  # let ComfyUI's event loop thread run (the GIL)
                i = _WS.match(text, i).end()
                if i < end and text[i] == ",":
                    i = _WS.match(text, i + 1).end()
                    continue
                if i < end and text[i] == "}":
                    i += 1
                    break
                return None
    except (ValueError, RecursionError, CheckpointError):  # JSONDecodeError, _HeaderJSONError
        return None
    if _WS.match(text, i).end() != end:
        return None
    return entries, metadata


def _describe_shape(seq: list) -> str:
    parts = [repr(x) if not isinstance(x, bool) else str(x).lower() for x in seq[:8]]
    return "[" + ", ".join(parts) + (", ...]" if len(seq) > 8 else "]")


def _validate_layout(path: str, entries: list[TensorEntry], data_len: int) -> list[TensorEntry]:
    """The format's `validate`: sorted by offsets, contiguous from 0, sizes exact (checked)."""
    entries = sorted(entries, key=lambda e: (e.start, e.end))
    pos = 0
    prev: TensorEntry | None = None
    for e in entries:
        tname = _short(e.name)
        span = f"data_offsets [{e.start}, {e.end}]"
        if e.end < e.start:
            raise _fail(path, f"tensor {tname}: {span} end before they start")
        if e.start > pos:
            raise _fail(
                path, f"tensor {tname}: {span} leave a hole of {e.start - pos} bytes after "
                + (f"tensor {_short(prev.name)}" if prev else "the start of the data")
                + " (tensors must be contiguous, starting at 0)"
            )
        if e.start < pos:
            raise _fail(path, f"tensor {tname}: {span} overlap tensor {_short(prev.name)} (ends at {pos})")
        # Checked arithmetic, left to right, exactly as the format does it (u64 overflow).
        numel = 1
        for d in e.shape:
            numel *= d
            if numel > _U64_MAX:
                raise _fail(path, f"tensor {tname}: shape {_describe_shape(list(e.shape))} overflows")
        bits = numel * DTYPE_BITS[e.dtype]
        if bits > _U64_MAX:
            raise _fail(path, f"tensor {tname}: shape {_describe_shape(list(e.shape))} overflows")
        if bits % 8:
            raise _fail(
                path, f"tensor {tname}: {numel} elements of {e.dtype} do not fill whole bytes "
                f"({bits} bits)"
            )
        if e.end - e.start != bits // 8:
            raise _fail(
                path, f"tensor {tname}: dtype {e.dtype} and shape {_describe_shape(list(e.shape))} need "
                f"{bits // 8} bytes but {span} span {e.end - e.start}"
            )
        pos = e.end
        prev = e
    if pos != data_len:
        if pos > data_len:
            raise _fail(
                path, f"file is {pos - data_len} bytes short (the header describes {pos} bytes of data, "
                f"the file has {data_len}): it is truncated; download or copy it again"
            )
        raise _fail(
            path, f"file has {data_len - pos} bytes after the last tensor (the header describes {pos} "
            f"bytes of data, the file has {data_len}): it is corrupt or not a plain safetensors file"
        )
    return entries


# ---------------------------------------------------------------------------------------------
# files


def _open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open read-only without blocking on a FIFO; only regular files (after symlinks) pass."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if os.path.islink(path):
            raise _fail(
                path, f"is a symbolic link to {os.readlink(path)!r}, which does not exist: fix or "
                "remove the link"
            ) from None
        raise _fail(path, "file not found") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a .safetensors file") from None
    except PermissionError:
        raise _fail(path, "cannot be read (permission denied)") from None
    except OSError as e:
        raise _fail(path, f"cannot be opened ({e.strerror or type(e).__name__})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = (
            "a directory" if stat.S_ISDIR(st.st_mode)
            else "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        raise _fail(path, f"is {kind}, not a .safetensors file")
    return fd, st


def _pread_exact(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    buf = bytearray(size)
    got = _readinto_full(f, memoryview(buf))
    return bytes(buf[:got])


def _readinto_full(f, view: memoryview) -> int:
    """Fill `view` from the file's current position; returns bytes read (short only at EOF)."""
    got = 0
    total = len(view)
    while got < total:
        n = f.readinto(view[got : min(total, got + _READ_CHUNK)])
        if not n:
            break
        got += n
    return got


def _read_header_from(f, path: str, size: int, max_header_bytes: int) -> SafetensorsHeader:
    def sniffed(reason: str) -> CheckpointError:
        what = _sniff(_pread_exact(f, 0, min(size, _SNIFF_BYTES)))
        return _fail(path, what) if what else _fail(path, reason)

    if size == 0:
        raise _fail(path, "is empty (0 bytes): the download or copy did not finish; get the file again")
    if size < 8:
        raise sniffed(
            f"is {size} bytes long, too short for a safetensors file (it starts with an 8-byte header "
            "length): the download or copy did not finish"
        )
    first = _pread_exact(f, 0, 8)
    if len(first) < 8:
        raise _fail(path, "file shrank while being read (it is being written or truncated)")
    n = int.from_bytes(first, "little")
    if n > MAX_HEADER_BYTES:
        raise sniffed(
            f"header length field says {n} bytes, above the format's limit of {MAX_HEADER_BYTES}: "
            "not a safetensors file, or a corrupt one"
        )
    if n > size - 8:
        raise sniffed(
            f"header length field says {n} bytes but only {size - 8} bytes follow it: the file is "
            "truncated or not a safetensors file"
        )
    if n > max_header_bytes:
        raise _fail(
            path, f"header is {n} bytes, above this reader's cap of {max_header_bytes} bytes",
            HeaderTooLargeError,
        )
    raw = _pread_exact(f, 8, n)
    if len(raw) < n:
        raise _fail(path, "file shrank while its header was being read (it is being written or truncated)")
    fast = None
    with contextlib.suppress(UnicodeDecodeError):  # _decode_json below names the byte
        fast = _stream_entries(path, raw.decode("utf-8"))
    if fast is not None:
        entries, metadata = fast
        entries = _validate_layout(path, entries, size - 8 - n)
        return SafetensorsHeader(
            path=path, tensors={e.name: e for e in entries}, metadata=metadata, header_len=n, file_size=size
        )
    try:
        obj = _decode_json(path, raw)
    except CheckpointError:
        # A header that starts like JSON is a (broken) safetensors header: keep the precise error.
        looks_json = raw.lstrip(b" \t\r\n")[:1] == b"{"
        what = None if looks_json else _sniff(_pread_exact(f, 0, min(size, _SNIFF_BYTES)))
        if what:
            raise _fail(path, what) from None
        raise
    entries, metadata = _parse_entries(path, obj)
    bad = _lone_surrogate(obj) if _SURROGATE_ESCAPE.search(raw.decode("utf-8")) else None
    if bad is not None:
        raise _fail(path, f"header string {_short(bad)} contains an invalid \\u escape (a lone surrogate)")
    entries = _validate_layout(path, entries, size - 8 - n)
    return SafetensorsHeader(
        path=path,
        tensors={e.name: e for e in entries},
        metadata=metadata,
        header_len=n,
        file_size=size,
    )


def read_header(path: str | os.PathLike, *, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Read and validate only the header of a safetensors file (constant time in the data size).

    Raises `CheckpointError` naming the file for anything the format forbids, for duplicate keys,
    and for things that are not safetensors files at all (pipes, directories, dangling links, Git
    LFS pointers, HTML pages, pickles, GGUF). A header above `max_header_bytes` (but within the
    format's own 100 MB) raises `HeaderTooLargeError`, which the web preview answers with 413.
    """
    p = os.fspath(path)
    fd, st = _open_regular(p)
    with os.fdopen(fd, "rb", buffering=0) as f:
        return _read_header_from(f, p, st.st_size, max_header_bytes)


def read_header_bytes(
    data: bytes, name: str = "<memory>", *, max_header_bytes: int = MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """`read_header` for a whole file already in memory (fuzzing, tests); `name` stands for the path."""
    return _read_header_from(io.BytesIO(data), name, len(data), max_header_bytes)


def torch_dtype(dtype: str) -> torch.dtype | None:
    """The torch dtype safetensors maps `dtype` to, or None (F6 types, or an older torch)."""
    import torch

    attr = _TORCH_DTYPES.get(dtype)
    return getattr(torch, attr, None) if attr else None


def _torch_shape(entry: TensorEntry, path: str) -> tuple[int, ...]:
    if entry.dtype != "F4":
        return entry.shape
    # Two E2M1 codes per byte: float4_e2m1fn_x2 with the last dimension halved (as safetensors.torch).
    if not entry.shape or entry.shape[-1] % 2:
        raise _fail(path, f"tensor {_short(entry.name)}: F4 shape {list(entry.shape)} has an odd last "
                    "dimension, which PyTorch's float4_e2m1fn_x2 cannot hold")
    return (*entry.shape[:-1], entry.shape[-1] // 2)


def iter_tensors(
    path: str | os.PathLike,
    names: Iterable[str] | None = None,
    *,
    header: SafetensorsHeader | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, cpu tensor)` one at a time, in file order, reading each tensor's bytes with a
    positioned read into memory it owns (no mmap: a file truncated meanwhile raises
    `CheckpointError` instead of SIGBUS). Only one tensor's bytes are held at a time by this
    generator. `names` restricts the tensors (a name not in the file is a `CheckpointError`);
    `header` skips re-reading a header already read. Dtypes convert as `safetensors.torch` does.
    """

    p = os.fspath(path)
    fd, st = _open_regular(p)
    with os.fdopen(fd, "rb", buffering=0) as f:
        hdr = header if header is not None else _read_header_from(f, p, st.st_size, MAX_HEADER_BYTES)
        if st.st_size != hdr.file_size:
            raise _fail(p, f"file changed size since its header was read ({hdr.file_size} -> {st.st_size} "
                        "bytes): it is being written; try again when the copy has finished")
        if names is None:
            wanted = list(hdr.tensors.values())
        else:
            want = set(names)
            missing = sorted(want - hdr.tensors.keys())
            if missing:
                shown = ", ".join(_short(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise _fail(p, f"{len(missing)} tensor(s) not in the file: {shown}")
            wanted = [e for e in hdr.tensors.values() if e.name in want]
        yield from _read_entries(f, p, hdr, wanted)


def _read_into(f, p: str, hdr: SafetensorsHeader, e: TensorEntry, dst: torch.Tensor) -> None:
    """Fill `dst` (a contiguous uint8 CPU tensor of `e.nbytes` bytes) with tensor `e`'s bytes by a
    positioned read; a short read (file truncated meanwhile) is a `CheckpointError`."""
    f.seek(hdr.data_start + e.start)
    got = _readinto_full(f, memoryview(dst.numpy()))
    if got != e.nbytes:
        raise _fail(
            p, f"file ended while reading tensor {_short(e.name)} (got {got} of {e.nbytes} bytes): "
            "it was truncated or replaced while being read; get the file again"
        )


def _read_entries(f, p: str, hdr: SafetensorsHeader, wanted: list[TensorEntry]):
    import torch

    for e in wanted:
        tdtype = torch_dtype(e.dtype)
        if tdtype is None:
            raise _fail(p, f"tensor {_short(e.name)}: dtype {e.dtype} has no PyTorch equivalent here")
        shape = _torch_shape(e, p)
        if e.nbytes == 0:
            yield e.name, torch.empty(shape, dtype=tdtype)
            continue
        # torch.empty, not bytearray: no zero-fill pass over memory the read overwrites anyway
        t = torch.empty(e.nbytes, dtype=torch.uint8)
        _read_into(f, p, hdr, e, t)
        if sys.byteorder == "big" and torch.empty((), dtype=tdtype).element_size() > 1:
            size = torch.empty((), dtype=tdtype).element_size()
            t = t.view(-1, size).flip(-1).reshape(-1)
        yield e.name, t.view(tdtype).reshape(shape)


# ---------------------------------------------------------------------------------------------
# files that are already quantized (issue 6: "a clear error, or for pre-quantized files a clear
# choice: load as is, with a note")

_FP8 = {"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
_PLAIN_FLOAT = {"BF16", "F16", "F32", "F64"}


@dataclass(frozen=True)
class CheckpointKind:
    """What `classify_checkpoint` found.

    kind:
      "plain"        bf16/fp16/fp32 Linear weights: quantize online as usual;
      "comfy_quant"  ComfyUI's own mixed-precision file (`<layer>.comfy_quant` tensors or the
                     `_quantization_metadata` entry): ComfyUI loads it as is;
      "scaled_fp8"   ComfyUI's older scaled-FP8 file (`scaled_fp8` marker / `.scale_weight`):
                     ComfyUI converts and loads it as is;
      "fp8"          Linear weights stored in an FP8 dtype without scales: ComfyUI loads it as is;
      "nvfp4"        NVFP4 (`weight_scale_2`): loadable only through ComfyUI's own quant ops;
      "mxfp4"        already packed MXFP4 / FP4 (F4 or F8_E8M0 tensors, uint8 codes with block
                     scales, `_blocks`/`_scales`): ComfyUI cannot load it; needs the bf16 file;
      "int"          integer-quantized (GPTQ/AWQ `qweight`, bitsandbytes `absmax`): same.
    comfyui_loads: whether ComfyUI's plain loader can load the file as it is (then the loader
      loads it without online quantization and reports `note`); otherwise the loader raises
      `CheckpointError` with `note`.
    """

    kind: str
    detail: str
    examples: tuple[str, ...] = ()
    comfyui_loads: bool = True

    @property
    def prequantized(self) -> bool:
        return self.kind != "plain"

    @property
    def note(self) -> str:
        if not self.prequantized:
            return self.detail
        ex = f" (e.g. {', '.join(self.examples[:3])})" if self.examples else ""
        if self.comfyui_loads:
            return (
                f"file is already quantized: {self.detail}{ex}; loaded as it is, without online "
                "quantization (load the bf16/fp16 release to quantize it here)"
            )
        return (
            f"file is already quantized: {self.detail}{ex}, which ComfyUI cannot load; use the "
            "bf16/fp16 release of this model (this pack quantizes it as it loads)"
        )


def _linear_weights(h: SafetensorsHeader) -> list[TensorEntry]:
    return [e for n, e in h.tensors.items() if n.endswith(".weight") and len(e.shape) == 2]


def classify_checkpoint(header: SafetensorsHeader) -> CheckpointKind:
    """Tell plain bf16/fp16 files from files that are already quantized, from the header alone.

    Checked in this order (the first match wins): ComfyUI `comfy_quant` markers, ComfyUI
    `scaled_fp8` markers, NVFP4, MXFP4/FP4 packing, integer quantization, FP8 weights.
    """
    names = list(header.tensors)
    meta = header.metadata

    def ex(pred) -> tuple[str, ...]:
        return tuple(n for n in names if pred(n))[:3]

    cq = ex(lambda n: n.endswith(".comfy_quant"))
    if cq or "_quantization_metadata" in meta:
        formats = _comfy_quant_formats(meta)
        detail = "ComfyUI mixed-precision quantization (comfy_quant)" + (
            f", formats {', '.join(formats)}" if formats else ""
        )
        return CheckpointKind("comfy_quant", detail, cq or ("__metadata__._quantization_metadata",))
    sf = ex(lambda n: n == "scaled_fp8" or n.endswith(".scaled_fp8") or n.endswith(".scale_weight"))
    if sf:
        return CheckpointKind("scaled_fp8", "ComfyUI scaled FP8 (scaled_fp8 / scale_weight)", sf)
    nv = ex(lambda n: n.endswith(".weight_scale_2"))
    if nv:
        return CheckpointKind("nvfp4", "NVFP4 (two-level scales, weight_scale_2)", nv)
    mx = ex(lambda n: header.tensors[n].dtype in ("F4", "F8_E8M0", "F6_E2M3", "F6_E3M2")
            or n.endswith(("_blocks", ".blocks")))
    if not mx:
        mx = tuple(_packed_u8_weights(header))[:3]
    if mx:
        return CheckpointKind("mxfp4", "packed MXFP4/FP4 weights (4-bit codes with block scales)", mx, False)
    iq = ex(lambda n: n.endswith((".qweight", ".absmax", ".qzeros")) or ".quant_state." in n)
    if iq:
        return CheckpointKind("int", "integer quantization (GPTQ/AWQ/bitsandbytes)", iq, False)
    fp8 = [e for e in _linear_weights(header) if e.dtype in _FP8]
    if fp8:
        dts = sorted({e.dtype for e in fp8})
        return CheckpointKind(
            "fp8", f"{len(fp8)} Linear weight(s) stored as {'/'.join(dts)}", tuple(e.name for e in fp8[:3])
        )
    dts = sorted({e.dtype for e in _linear_weights(header)})
    return CheckpointKind("plain", f"Linear weights in {'/'.join(dts) or 'no Linear weights'}")


def _packed_u8_weights(h: SafetensorsHeader) -> Iterator[str]:
    """uint8 `X.weight` [N, K/2] next to a uint8 scale [N, K/32]: MXFP4 codes + E8M0 scales."""
    for e in _linear_weights(h):
        if e.dtype != "U8":
            continue
        base = e.name[: -len(".weight")]
        for suffix in (".weight_scale", ".weight_scales", ".scales", ".weight_scale_inv"):
            s = h.tensors.get(base + suffix)
            if s is not None and s.dtype in ("U8", "F8_E8M0") and len(s.shape) == 2 and s.shape[1] \
                    and e.shape[1] == 16 * s.shape[1]:
                yield e.name
                break


def _comfy_quant_formats(meta: dict[str, str]) -> list[str]:
    text = meta.get("_quantization_metadata")
    if not text or len(text) > 10_000_000:
        return []
    try:
        layers = json.loads(text).get("layers", {})
        return sorted({str(v.get("format")) for v in layers.values() if isinstance(v, dict)})[:5]
    except (ValueError, AttributeError, RecursionError):
        return []


# ---------------------------------------------------------------------------------------------
# a lazy state dict: tensors that read their bytes (pread, no mmap) only when an op uses them


class _Reader:
    """One open file shared by the lazy tensors of a state dict; keeps the last tensor it read so
    the several ops a quantizer runs on one weight read it once (memory: about one tensor)."""

    def __init__(self, path: str, header: SafetensorsHeader):
        fd, st = _open_regular(path)
        self.f = os.fdopen(fd, "rb", buffering=0)
        self.path, self.header = path, header
        if st.st_size != header.file_size:
            self.f.close()
            raise _fail(path, f"file changed size since its header was read ({header.file_size} -> "
                        f"{st.st_size} bytes): it is being written; try again when the copy has finished")
        self.lock = threading.Lock()
        self.last: tuple[str, object] | None = None

    def read(self, name: str):
        with self.lock:
            if self.last is not None and self.last[0] == name:
                return self.last[1]
            self.last = None  # drop the previous tensor before reading the next
            t = next(_read_entries(self.f, self.path, self.header, [self.header.tensors[name]]))[1]
            self.last = (name, t)
            return t

    def read_into(self, name: str, dst: torch.Tensor) -> None:
        """Read tensor `name` straight into `dst`, a plain contiguous CPU tensor of its dtype and
        shape (`param.copy_(lazy)` in `load_state_dict`): one positioned read into the
        destination instead of a read into a temporary and a copy."""
        import torch

        with self.lock:
            if self.last is not None and self.last[0] == name:
                dst.copy_(self.last[1])
                return
            self.last = None
            e = self.header.tensors[name]
            _read_into(self.f, self.path, self.header, e, dst.detach().reshape(-1).view(torch.uint8))

    def take(self, name: str):
        """The tensor, owned by the caller from now on (the cache lets go of it)."""
        t = self.read(name)
        with self.lock:
            if self.last is not None and self.last[0] == name:
                self.last = None
        return t

    def __del__(self):
        f = getattr(self, "f", None)
        if f is not None:
            f.close()


def lazy_state_dict(path: str | os.PathLike, header: SafetensorsHeader | None = None) -> dict:
    """`{name: tensor}` for the whole file without reading any data: each value is a CPU tensor
    subclass with the right shape and dtype whose bytes are read (positioned reads, no mmap) when
    a torch op first uses it, e.g. `param.copy_(t)` in `load_state_dict` or a quantizer's first
    op. Memory stays at about one tensor beyond what the consumer keeps, and a file truncated
    meanwhile raises `CheckpointError` (through the op) instead of killing the process.
    `.materialize()` returns the plain tensor. In-place ops on these tensors are refused."""
    p = os.fspath(path)
    hdr = header if header is not None else read_header(p)
    reader = _Reader(p, hdr)
    out = {}
    for name, e in hdr.tensors.items():
        dt = torch_dtype(e.dtype)
        if dt is None:
            raise _fail(p, f"tensor {_short(name)}: dtype {e.dtype} has no PyTorch equivalent here")
        out[name] = _lazy_tensor_cls()(reader, name, _torch_shape(e, p), dt)
    return out


_LAZY_CLS = None


def _lazy_tensor_cls():
    """Defined on first use so that importing this module does not import torch."""
    global _LAZY_CLS
    if _LAZY_CLS is not None:
        return _LAZY_CLS
    import torch
    from torch.utils._pytree import tree_map

    class LazySafetensorsTensor(torch.Tensor):
        @staticmethod
        def __new__(cls, reader: _Reader, name: str, shape, dtype):
            t = torch.Tensor._make_wrapper_subclass(
                cls, shape, dtype=dtype, device="cpu", requires_grad=False
            )
            t._reader, t._name = reader, name
            return t

        def __init__(self, *args, **kwargs):
            pass

        __torch_function__ = torch._C._disabled_torch_function_impl  # results stay plain tensors

        def materialize(self):
            """The plain tensor (owned by the caller: later reads of this name read the file again)."""
            return self._reader.take(self._name)

        # Conversions that PyTorch answers with `self` when nothing changes (no dispatch happens):
        # they must hand out a real tensor, e.g. for nn.Parameter(weight.to(device, dtype)).
        def to(self, *args, **kwargs):
            return self.materialize().to(*args, **kwargs)

        def cpu(self, *args, **kwargs):
            return self.materialize().cpu(*args, **kwargs)

        def cuda(self, *args, **kwargs):
            return self.materialize().cuda(*args, **kwargs)

        def contiguous(self, *args, **kwargs):
            return self.materialize().contiguous(*args, **kwargs)

        def float(self):
            return self.materialize().float()

        def half(self):
            return self.materialize().half()

        def bfloat16(self):
            return self.materialize().bfloat16()

        def type(self, *args, **kwargs):
            return self.materialize().type(*args, **kwargs)

        def __repr__(self):
            return f"LazySafetensorsTensor({self._name!r}, shape={tuple(self.shape)}, dtype={self.dtype})"

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            schema = getattr(func, "_schema", None)
            if schema is not None and schema.is_mutable and args and isinstance(args[0], cls):
                raise RuntimeError(f"{func}: lazy safetensors tensors are read-only")

            if func is _COPY and len(args) >= 2 and _direct_copy(cls, args[0], args[1]):
                args[1]._reader.read_into(args[1]._name, args[0])
                return args[0]

            def real(x):
                return x._reader.read(x._name) if isinstance(x, cls) else x

            return func(*tree_map(real, args), **tree_map(real, kwargs or {}))

    global _COPY
    _COPY = torch.ops.aten.copy_.default
    _LAZY_CLS = LazySafetensorsTensor
    return _LAZY_CLS


_COPY = None


def _direct_copy(cls, dst, src) -> bool:
    """Whether `dst.copy_(src)` can read `src`'s bytes straight into `dst`: `src` lazy, `dst` a
    plain contiguous CPU tensor of the same dtype and shape (no cast, no broadcast), and a
    little-endian host (the file's byte order)."""
    import torch

    return (
        isinstance(src, cls)
        and not isinstance(dst, cls)
        and type(dst) in (torch.Tensor, torch.nn.Parameter)
        and dst.device.type == "cpu"
        and dst.dtype == src.dtype
        and dst.shape == src.shape
        and dst.is_contiguous()
        and dst.numel() > 0
        and sys.byteorder == "little"
    )
