"""quant/safetensors_header.py: the format's rules one at a time, each with the
exact message, plus agreement with the safetensors library on valid files."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant.checkpoint import (
    DTYPE_BITS,
    SafetensorsHeader,
    iter_tensors,
    read_header,
    torch_dtype,
)
from quant.errors import CheckpointError, HeaderTooLargeError

U8x2 = {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}


def write(path, header, data: bytes = b"", *, length: int | None = None) -> str:
    """A file with `header` (dict or raw bytes) behind its 8-byte length (or a forged `length`)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + raw + data)
    return str(path)


def message(path) -> str:
    with pytest.raises(CheckpointError) as ei:
        read_header(path)
    return str(ei.value)


def test_valid_file_matches_safetensors_library(tmp_path):
    sd = {
        "blocks.0.w": torch.randn(3, 4, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(3.0),
        "fp8": torch.randn(5).to(torch.float8_e4m3fn),
        "e8m0": torch.ones(3).to(torch.float8_e8m0fnu),
        "half": torch.randn(7).half(),
        "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "flags": torch.tensor([True, False]),
    }
    fp4 = getattr(torch, "float4_e2m1fn_x2", None)  # PyTorch 2.8 and newer
    if fp4 is not None:
        sd["fp4"] = torch.zeros(2, 4, dtype=fp4)
    p = str(tmp_path / "m.safetensors")
    save_file(sd, p, metadata={"format": "pt", "note": "x"})
    h = read_header(p)
    assert isinstance(h, SafetensorsHeader)
    assert h.metadata == {"format": "pt", "note": "x"}
    assert h.file_size == os.path.getsize(p)
    with safe_open(p, "pt") as f:
        assert set(f.keys()) == set(h.tensors)
        assert f.metadata() == h.metadata
        for name, t in iter_tensors(p):
            ref = f.get_tensor(name)
            assert t.dtype == ref.dtype == sd[name].dtype, name
            assert t.shape == ref.shape == sd[name].shape, name
            assert torch.equal(t.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), name
    # offsets are in file order, contiguous
    ends = [(e.start, e.end) for e in h.tensors.values()]
    assert ends == sorted(ends) and ends[0][0] == 0
    assert h.shapes()["blocks.0.w"] == (3, 4)
    assert fp4 is None or h.shapes()["fp4"] == (2, 8)  # two E2M1 codes per byte


def test_iter_tensors_subset_and_missing_names(tmp_path):
    p = str(tmp_path / "m.safetensors")
    save_file({"a": torch.ones(2), "b": torch.zeros(3), "c": torch.ones(1)}, p)
    assert [n for n, _ in iter_tensors(p, names=["c", "a"])] == ["a", "c"]
    with pytest.raises(CheckpointError) as ei:
        list(iter_tensors(p, names=["a", "nope"]))
    assert str(ei.value) == f"{p}: 1 tensor(s) not in the file: 'nope'"


def test_whitespace_unaligned_zero_dim_and_empty_are_valid(tmp_path):
    raw = b'  \n{"a":{"dtype":"U8","shape":[],"data_offsets":[0,1]},' \
          b'"z":{"dtype":"F32","shape":[4,0],"data_offsets":[1,1]}}\t  '
    p = write(tmp_path / "w.safetensors", raw, b"\x07")
    h = read_header(p)
    assert h.header_len == len(raw) and h.header_len % 8 != 0
    assert h.tensors["a"].shape == () and h.tensors["z"].shape == (4, 0)
    got = dict(iter_tensors(p))
    assert got["a"].item() == 7 and got["z"].shape == (4, 0)


def test_metadata_null_and_extra_fields_accepted_like_the_library(tmp_path):
    p = write(tmp_path / "m.safetensors", {"__metadata__": None, "a": {**U8x2, "extra": [1.5, -3]}}, b"xy")
    assert read_header(p).metadata == {}


def test_closed_dtype_list_is_the_libraries():
    assert set(DTYPE_BITS) >= {"F4", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "BF16", "F16", "F32"}
    assert torch_dtype("F8_E4M3") is torch.float8_e4m3fn and torch_dtype("F6_E2M3") is None


def test_header_cap_raises_header_too_large(tmp_path):
    p = write(tmp_path / "big.safetensors", {"a": U8x2}, b"ab")
    n = read_header(p).header_len
    with pytest.raises(HeaderTooLargeError) as ei:
        read_header(p, max_header_bytes=n - 1)
    assert str(ei.value) == f"{p}: header is {n} bytes, above this reader's cap of {n - 1} bytes"
    assert ei.value.reason.startswith("header is") and ei.value.path == p


def test_only_the_header_is_read_of_a_huge_sparse_file(tmp_path):
    # 30 GB of declared data in a sparse file: read_header must not touch it.
    size = 30 * 10**9
    hdr = json.dumps({"w": {"dtype": "BF16", "shape": [size // 2], "data_offsets": [0, size]}}).encode()
    p = str(tmp_path / "huge.safetensors")
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)) + hdr)
        f.truncate(8 + len(hdr) + size)
    assert read_header(p).tensors["w"].nbytes == size


# --- each rule broken once, with the exact message -----------------------------------------------

CASES = [
    ("empty file", None, None, "is empty (0 bytes): the download or copy did not finish; get the file again"),
    ("7 bytes", "raw", b"\x01" * 7,
     "is 7 bytes long, too short for a safetensors file (it starts with an 8-byte header length): "
     "the download or copy did not finish"),
    ("length only", "raw", struct.pack("<Q", 0),
     "header is not valid JSON (Expecting value at character 0)"),
    ("length 100,000,001", "raw", struct.pack("<Q", 100_000_001) + b"{}",
     "header length field says 100000001 bytes, above the format's limit of 100000000: "
     "not a safetensors file, or a corrupt one"),
    ("length 2^64-1", "raw", b"\xff" * 8 + b"{}",
     f"header length field says {2**64 - 1} bytes, above the format's limit of 100000000: "
     "not a safetensors file, or a corrupt one"),
    ("length past EOF", "raw", struct.pack("<Q", 50) + b"{}",
     "header length field says 50 bytes but only 2 bytes follow it: the file is truncated or not "
     "a safetensors file"),
    ("invalid utf-8", "hdr", b'{"a\xff":1}', "header is not valid UTF-8 (byte 11 of the file)"),
    ("invalid json", "hdr", b'{"a": ', "header is not valid JSON (Expecting value at character 6)"),
    ("trailing garbage", "hdr", b'{} x', "header is not valid JSON (Extra data at character 3)"),
    ("NaN literal", "hdr", b'{"a": NaN}', "header is not valid safetensors JSON: NaN is not valid JSON"),
    ("deep nesting", "hdr", b"[" * 100_000 + b"]" * 100_000,
     "header JSON is nested too deeply (a safetensors header nests 3 levels)"),
    ("not an object", "hdr", b"[1, 2]", "header is a JSON array, not an object mapping tensor names"),
    ("metadata int value", "obj", {"__metadata__": {"k": 1}, "a": U8x2},
     "__metadata__ value of 'k' must be a string, got 1 (number)"),
    ("metadata list", "obj", {"__metadata__": ["k"], "a": U8x2},
     "__metadata__ must map strings to strings, got [\"k\"] (array)"),
    ("metadata nested", "obj", {"__metadata__": {"k": {"x": "y"}}, "a": U8x2},
     "__metadata__ value of 'k' must be a string, got {\"x\": \"y\"} (object)"),
    ("entry not object", "obj", {"a": "x"}, "tensor 'a': entry must be an object, got \"x\" (string)"),
    ("missing shape", "obj", {"a": {"dtype": "U8", "data_offsets": [0, 2]}},
     "tensor 'a': missing field 'shape'"),
    ("unknown dtype", "obj", {"a": {**U8x2, "dtype": "F8_E4M3FN"}},
     "tensor 'a': unknown dtype 'F8_E4M3FN' (known: " + ", ".join(DTYPE_BITS) + ")"),
    ("dtype not string", "obj", {"a": {**U8x2, "dtype": 8}},
     "tensor 'a': unknown dtype 8 (number) (known: " + ", ".join(DTYPE_BITS) + ")"),
    ("negative dim", "obj", {"a": {**U8x2, "shape": [-2]}},
     "tensor 'a': shape [-2] has a dimension that is not a non-negative integer: -2 (negative)"),
    ("float dim", "hdr", b'{"a":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}}',
     "tensor 'a': shape [2.0] has a dimension that is not a non-negative integer: 2.0 (not an integer)"),
    ("boolean dim", "obj", {"a": {**U8x2, "shape": [True]}},
     "tensor 'a': shape [true] has a dimension that is not a non-negative integer: true (a boolean)"),
    ("huge integer dim", "hdr", b'{"a":{"dtype":"U8","shape":[' + b"9" * 45 + b'],"data_offsets":[0,2]}}',
     "tensor 'a': shape [" + "9" * 37 + "...] has a dimension that is not a non-negative integer: "
     + "9" * 37 + "... (larger than 2^64-1)"),
    ("5000-digit integer", "hdr", b'{"a":{"dtype":"U8","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,2]}}',
     "header is not valid safetensors JSON: number " + "9" * 20 + "...(5000 characters) is out of range"),
    ("lone surrogate in an ignored field", "hdr",
     b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"x":["\\udc00"]}}',
     "header string '\\udc00' contains an invalid \\u escape (a lone surrogate)"),
    ("overflowing float in an ignored field", "hdr",
     b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"x":1e400}}',
     "header is not valid safetensors JSON: number 1e400 is out of range"),
    ("shape not list", "obj", {"a": {**U8x2, "shape": "2"}},
     "tensor 'a': shape must be a list of integers, got \"2\" (string)"),
    ("offsets three", "obj", {"a": {**U8x2, "data_offsets": [0, 2, 2]}},
     "tensor 'a': data_offsets must be two non-negative integers [start, end], got [0, 2, 2]"),
    ("size overflow", "obj", {"a": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 2]}},
     "tensor 'a': shape [4294967296, 4294967296] overflows"),
    ("bits overflow", "obj", {"a": {"dtype": "F64", "shape": [2**62], "data_offsets": [0, 2]}},
     "tensor 'a': shape [4611686018427387904] overflows"),
    ("F4 odd", "obj", {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}},
     "tensor 'a': 3 elements of F4 do not fill whole bytes (12 bits)"),
    ("wrong byte length", "obj", {"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 2]}},
     "tensor 'a': dtype BF16 and shape [2] need 4 bytes but data_offsets [0, 2] span 2"),
    ("not starting at 0", "obj", {"a": {**U8x2, "data_offsets": [1, 3]}},
     "tensor 'a': data_offsets [1, 3] leave a hole of 1 bytes after the start of the data "
     "(tensors must be contiguous, starting at 0)"),
    ("hole", "obj", {"a": {**U8x2, "data_offsets": [0, 2]}, "b": {**U8x2, "data_offsets": [3, 5]}},
     "tensor 'b': data_offsets [3, 5] leave a hole of 1 bytes after tensor 'a' "
     "(tensors must be contiguous, starting at 0)"),
    ("overlap", "obj", {"a": {**U8x2, "data_offsets": [0, 2]}, "b": {**U8x2, "data_offsets": [1, 3]}},
     "tensor 'b': data_offsets [1, 3] overlap tensor 'a' (ends at 2)"),
    ("end before start", "obj", {"a": {**U8x2, "data_offsets": [2, 0]}},
     "tensor 'a': data_offsets [2, 0] end before they start"),
    ("one byte short", "short", {"a": {**U8x2, "data_offsets": [0, 2]}},
     "file is 1 bytes short (the header describes 2 bytes of data, the file has 1): it is truncated; "
     "download or copy it again"),
    ("bytes after last tensor", "long", {"a": U8x2},
     "file has 1 bytes after the last tensor (the header describes 2 bytes of data, the file has 3): "
     "it is corrupt or not a plain safetensors file"),
    ("duplicate key", "hdr",
     b'{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}',
     "header is not valid safetensors JSON: key 'a' appears twice; the safetensors format forbids "
     "duplicate keys (the safetensors library silently keeps the last one, so which tensor is loaded "
     "would be ambiguous): re-save the file with a tool that writes each key once"),
    ("lone surrogate", "hdr", b'{"a\\ud800":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}',
     "key 'a\\ud800' contains an invalid \\u escape (a lone surrogate)"),
]


@pytest.mark.parametrize("kind,content,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_rule_broken_once_exact_message(tmp_path, kind, content, expected):
    p = tmp_path / "bad.safetensors"
    _write_case(p, kind, content)
    assert message(p) == f"{p}: {expected}"


def _write_case(p, kind, content) -> None:
    """Write one CASES file: kind None = empty file, "raw" = the bytes as given, otherwise the
    header `content` followed by the data bytes that kind calls for."""
    if kind is None:
        p.write_bytes(b"")
    elif kind == "raw":
        p.write_bytes(content)
    elif kind == "hdr":
        write(p, content, b"\0\0\0")
    elif kind == "short":
        write(p, content, b"\0")
    elif kind == "long":
        write(p, content, b"\0\0\0")
    else:
        write(p, content, b"\0\0")


def test_library_rejects_what_we_reject_for_format_rules(tmp_path):
    """Our verdict agrees with safetensors on every case above except duplicate keys (documented)."""
    from safetensors import SafetensorError

    for name, kind, content, _ in CASES:
        if name == "duplicate key" or kind is None:
            continue
        p = tmp_path / f"c{abs(hash(name))}.safetensors"
        _write_case(p, kind, content)
        with pytest.raises(SafetensorError), safe_open(str(p), "pt"):
            pass


def test_lazy_state_dict_loads_a_module_exactly(tmp_path):
    from quant.checkpoint import lazy_state_dict

    def make():
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))

    m = make().to(torch.bfloat16)
    p = str(tmp_path / "m.safetensors")
    save_file(m.state_dict(), p)
    sd = lazy_state_dict(p)
    assert {k: (v.shape, v.dtype) for k, v in sd.items()} == {
        k: (v.shape, v.dtype) for k, v in m.state_dict().items()
    }
    m2 = make().to(torch.bfloat16)
    m2.load_state_dict(sd)
    assert all(torch.equal(a, m2.state_dict()[k]) for k, a in m.state_dict().items())
    w = sd["0.weight"]
    assert type(w.to(torch.bfloat16)) is torch.Tensor  # a real tensor, e.g. for nn.Parameter
    assert torch.equal(w.float().abs().amax(), m[0].weight.float().abs().amax())
    with pytest.raises(RuntimeError, match="read-only"):
        w.mul_(2)
    reader = w._reader
    _ = sd["2.weight"] + 0
    assert reader.last is not None and reader.last[0] == "2.weight"  # holds one tensor at most


def test_lazy_copy_reads_straight_into_the_destination(tmp_path):
    """`param.copy_(lazy)` (load_state_dict) reads the bytes into the destination with one
    positioned read (no temporary, nothing cached); casts and strided destinations still work,
    and a file truncated meanwhile is still a CheckpointError."""
    from quant.checkpoint import lazy_state_dict

    a = torch.randn(48, 64).to(torch.bfloat16)
    p = str(tmp_path / "m.safetensors")
    save_file({"a": a, "b": torch.ones(256, dtype=torch.bfloat16)}, p)  # same dtype: "b" is last
    sd = lazy_state_dict(p)
    dst = torch.nn.Parameter(torch.zeros(48, 64, dtype=torch.bfloat16))  # requires_grad, as nn.Linear's
    with torch.no_grad():
        assert dst.copy_(sd["a"]) is dst
    assert torch.equal(dst.detach(), a)
    assert sd["a"]._reader.last is None  # read into dst, not into the reader's cache
    f32 = torch.zeros(48, 64).copy_(sd["a"])  # a cast: the generic path
    assert torch.equal(f32, a.float())
    strided = torch.zeros(64, 48, dtype=torch.bfloat16).t().copy_(sd["a"])  # not contiguous
    assert torch.equal(strided, a)
    os.truncate(p, os.path.getsize(p) - 100)
    with pytest.raises(CheckpointError, match="file ended while reading tensor 'b'"):
        torch.zeros(256, dtype=torch.bfloat16).copy_(sd["b"])  # the direct path


def test_lazy_state_dict_truncated_file_raises_checkpoint_error(tmp_path):
    from quant.checkpoint import lazy_state_dict

    p = str(tmp_path / "m.safetensors")
    save_file({"a": torch.ones(256), "b": torch.ones(256)}, p)
    sd = lazy_state_dict(p)
    assert torch.equal(sd["a"] + 0, torch.ones(256))
    os.truncate(p, os.path.getsize(p) - 100)
    with pytest.raises(CheckpointError, match="file ended while reading tensor 'b'"):
        sd["b"] + 0


@pytest.mark.parametrize(
    "attr", ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"]
)
def test_all_finite_finds_every_non_finite_float8_byte(attr):
    """all_finite's float8 check (reductions over the bytes) against the values themselves, for every
    one of the 256 bytes, alone and among finite bytes at either end of a tensor; finite_flag (the
    same check left on the device, no synchronisation) agrees."""
    from quant.checkpoint.reader import all_finite, finite_flag

    dtype = getattr(torch, attr, None)
    if dtype is None:
        pytest.skip(f"this torch has no {attr}")
    every = torch.arange(256, dtype=torch.uint8)
    # index the bytes: PyTorch 2.9 and older cannot index float8 tensors on the CPU
    finite = every[torch.isfinite(every.view(dtype).float())].view(dtype)
    for b in range(256):
        t = torch.tensor([b], dtype=torch.uint8).view(dtype)
        expected = bool(torch.isfinite(t.float()).all())
        assert all_finite(t) == expected, (attr, hex(b))
        assert all_finite(torch.cat([finite, t, finite])) == expected, (attr, hex(b))
        flag = finite_flag(torch.cat([finite, t, finite]))
        assert flag.dtype == torch.bool and flag.dim() == 0 and bool(flag) == expected, (attr, hex(b))
