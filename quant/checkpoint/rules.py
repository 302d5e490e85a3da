"""The safetensors format's own rules on a header (huggingface/safetensors `tensor.rs`): JSON with
its number rules, entries, metadata, and the data layout (sorted, contiguous, exact sizes)."""

from __future__ import annotations

import itertools
import json
import re
import time

from ..errors import CheckpointError
from .header import _U64_MAX, DTYPE_BITS, TensorEntry, _fail, _short

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
        # bounds that to a few ms (measured in tests/unit/test_bad_inputs.py).
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


