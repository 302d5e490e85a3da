"""A strict reader for untrusted `.safetensors` files: the header without the data, and tensors
one at a time by positioned reads.

Every rule the format itself enforces (huggingface/safetensors `tensor.rs`) is
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
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ..errors import CheckpointError, HeaderTooLargeError, NonFiniteWeightError
from .header import (
    _READ_CHUNK,
    _TORCH_DTYPES,
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorEntry,
    _fail,
    _short,
)
from .rules import (
    _SURROGATE_ESCAPE,
    _decode_json,
    _lone_surrogate,
    _parse_entries,
    _stream_entries,
    _validate_layout,
)
from .sniff import _SNIFF_BYTES, _sniff

if TYPE_CHECKING:
    import torch

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


_I64_MAX = 2**63 - 1


def _torch_shape(entry: TensorEntry, path: str) -> tuple[int, ...]:
    # The format allows any u64 dimension when another one is 0 (no data); PyTorch holds sizes and
    # strides in int64 and fails deep in C++ on larger ones.
    span = 1
    for d in entry.shape:
        span *= max(d, 1)
    if span > _I64_MAX:
        raise _fail(path, f"tensor {_short(entry.name)}: shape {list(entry.shape)} is too large for PyTorch "
                    "(a dimension, or the product of the dimensions, is above 2^63-1) although it holds "
                    f"{entry.nbytes} bytes: the file is damaged or was made to break readers")
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


# The NaN/Inf bytes of each float8 dtype sit at an end of the uint8 or of the int8 range, so one
# max (or min) over the bytes finds them: at most two reductions without temporaries, where a mask,
# a compare and an `any` took three passes and two temporaries (13x slower on a CPU, most of the
# time of loading an already packed FP8 file). Per dtype attribute: (smallest non-finite byte as
# uint8, smallest non-finite byte as int8 >= 0, whether int8's -128 is non-finite), None = none.
_FLOAT8_NON_FINITE = {
    "float8_e4m3fn": (0xFF, 0x7F, False),  # NaN: 0x7F, 0xFF
    "float8_e5m2": (0xFC, 0x7C, False),  # Inf/NaN: 0x7C-0x7F, 0xFC-0xFF
    "float8_e4m3fnuz": (None, None, True),  # NaN: 0x80
    "float8_e5m2fnuz": (None, None, True),  # NaN: 0x80
    "float8_e8m0fnu": (0xFF, None, False),  # NaN: 0xFF
}


def finite_flag(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor on t's device, read without a synchronisation: whether t holds no NaN
    or Inf. FP8/E8M0 codes are tested by their byte ranges (amax/amin of byte views: one read
    each, no elementwise temporary); non-float tensors are finite."""
    import torch

    if t.numel() == 0 or not t.is_floating_point():
        return torch.ones((), dtype=torch.bool, device=t.device)
    for attr, (u_first, i_first, i_lowest) in _FLOAT8_NON_FINITE.items():
        if t.dtype == getattr(torch, attr, None):
            u = t.view(torch.uint8)
            ok = torch.ones((), dtype=torch.bool, device=t.device)
            if u_first is not None:
                ok = ok & (u.amax() < u_first)
            if i_first is not None:
                ok = ok & (u.view(torch.int8).amax() < i_first)
            if i_lowest:
                ok = ok & (u.view(torch.int8).amin() != -128)
            return ok
    return torch.isfinite(t).all()


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf, in one reduction on its device: the sum of finite values
    is finite (an overflowing sum is confirmed element-wise). Non-float tensors are finite."""
    import torch

    if t.numel() == 0:
        return True
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
            return True
        return bool(torch.isfinite(t).all())
    return bool(finite_flag(t))


def non_finite_error(p: str, name: str, shape) -> NonFiniteWeightError:
    dims = "x".join(str(d) for d in shape)
    return NonFiniteWeightError(
        f"{p}: tensor {name!r} [{dims}] contains NaN or Inf values: the checkpoint is damaged (get the "
        "file again); a model with such values renders black or noise. Allow non-finite values to "
        "load it anyway"
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
