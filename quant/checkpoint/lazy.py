"""A lazy state dict: tensors that read their bytes (positioned reads, no mmap) only when an op
uses them, so a model loads one layer at a time without a full bf16 copy in memory."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import TYPE_CHECKING

from ..errors import CheckpointError, NonFiniteWeightError
from .header import (
    SafetensorsHeader,
    _fail,
    _short,
)

if TYPE_CHECKING:
    import torch

from .reader import (
    _open_regular,
    _read_entries,
    _read_into,
    _torch_shape,
    all_finite,
    non_finite_error,
    read_header,
    torch_dtype,
)


class _Reader:
    """One open file shared by the lazy tensors of a state dict; keeps the last tensor it read so
    the several ops a quantizer runs on one weight read it once (memory: about one tensor).

    Every tensor read is checked for NaN/Inf (one reduction, where it is read): a non-finite one
    raises NonFiniteWeightError naming it, or with `check_finite=False` is listed in `non_finite`.
    `close()` lets go of the file at once (a failed load must not keep it open).

    The first error a read raised stays in `error`, and later reads raise it again at once:
    `nn.Module.load_state_dict` turns exceptions from `param.copy_` into one RuntimeError text
    and goes on with the other tensors, so the caller re-raises `error` itself."""

    def __init__(self, path: str, header: SafetensorsHeader, check_finite: bool = True):
        fd, st = _open_regular(path)
        self.f = os.fdopen(fd, "rb", buffering=0)
        self.path, self.header = path, header
        self.check_finite = check_finite
        self.non_finite: list[str] = []
        self._checked: set[str] = set()
        self.error: Exception | None = None
        if st.st_size != header.file_size:
            self.f.close()
            raise _fail(path, f"file changed size since its header was read ({header.file_size} -> "
                        f"{st.st_size} bytes): it is being written; try again when the copy has finished")
        self.lock = threading.Lock()
        self.last: tuple[str, object] | None = None
        # called with the bytes of each tensor read from the file (a progress bar, which may raise
        # to cancel: the exception is kept in `error` like a read error, see above)
        self.on_read = None

    def read(self, name: str):
        with self.lock, self._recording():
            if self.last is not None and self.last[0] == name:
                return self.last[1]
            self.last = None  # drop the previous tensor before reading the next
            t = next(_read_entries(self._file(), self.path, self.header, [self.header.tensors[name]]))[1]
            self._check(name, t)
            self.last = (name, t)
            self._report(self.header.tensors[name].nbytes)
            return t

    @contextlib.contextmanager
    def _recording(self):
        if self.error is not None:
            raise self.error
        try:
            yield
        except (CheckpointError, NonFiniteWeightError) as e:
            self.error = e
            raise

    def _file(self):
        if self.f is None:
            raise _fail(self.path, "was closed after a failed load; load it again")
        return self.f

    def checked_by_caller(self, name: str) -> None:
        """Skip the NaN/Inf reduction for `name`: its reader checks the values itself (a weight bound
        for the quantizer, which refuses non-finite values on the device it quantizes on), so the
        host does not scan it a second time."""
        self._checked.add(name)

    def _check(self, name: str, t) -> None:
        if name in self._checked:
            return
        if not all_finite(t):
            if self.check_finite:
                raise non_finite_error(self.path, name, t.shape)
            self.non_finite.append(name)
        self._checked.add(name)

    def read_into(self, name: str, dst: torch.Tensor) -> None:
        """Read tensor `name` straight into `dst`, a plain contiguous CPU tensor of its dtype and
        shape (`param.copy_(lazy)` in `load_state_dict`): one positioned read into the
        destination instead of a read into a temporary and a copy."""
        import torch

        with self.lock, self._recording():
            if self.last is not None and self.last[0] == name:
                dst.copy_(self.last[1])
                return
            self.last = None
            e = self.header.tensors[name]
            _read_into(self._file(), self.path, self.header, e, dst.detach().reshape(-1).view(torch.uint8))
            self._check(name, dst)
            self._report(e.nbytes)

    def _report(self, nbytes: int) -> None:
        if self.on_read is None:
            return
        try:
            self.on_read(nbytes)
        except BaseException as e:  # e.g. ComfyUI's interrupt: later reads raise it at once
            self.error = e
            raise

    def take(self, name: str):
        """The tensor, owned by the caller from now on (the cache lets go of it)."""
        t = self.read(name)
        with self.lock:
            if self.last is not None and self.last[0] == name:
                self.last = None
        return t

    def close(self) -> None:
        f, self.f, self.last = getattr(self, "f", None), None, None
        if f is not None:
            f.close()

    __del__ = close


class LazyStateDict(dict):
    """The dict `lazy_state_dict` returns; `.reader` is the file they read from (close it to let go
    of the file before the tensors are gone; `.reader.non_finite` lists NaN/Inf tensors allowed)."""

    reader: _Reader


def lazy_state_dict(
    path: str | os.PathLike,
    header: SafetensorsHeader | None = None,
    *,
    eager_bytes: int = 0,
    check_finite: bool = True,
) -> LazyStateDict:
    """`{name: tensor}` for the whole file without reading any data: each value is a CPU tensor
    subclass with the right shape and dtype whose bytes are read (positioned reads, no mmap) when
    a torch op first uses it, e.g. `param.copy_(t)` in `load_state_dict` or a quantizer's first
    op. Memory stays at about one tensor beyond what the consumer keeps, and a file truncated
    meanwhile raises `CheckpointError` (through the op) instead of killing the process.
    `.materialize()` returns the plain tensor. In-place ops on these tensors are refused.

    Tensors of at most `eager_bytes` bytes are read now into plain tensors (positioned reads too):
    for consumers that need real storage (`.numpy()`), e.g. ComfyUI on already-quantized files.
    Every tensor read is checked for NaN/Inf (`check_finite`, see `_Reader`)."""
    p = os.fspath(path)
    hdr = header if header is not None else read_header(p)
    shapes = {}
    for name, e in hdr.tensors.items():  # every refusal before the file is opened
        if torch_dtype(e.dtype) is None:
            raise _fail(p, f"tensor {_short(name)}: dtype {e.dtype} has no PyTorch equivalent here")
        shapes[name] = _torch_shape(e, p)
    reader = _Reader(p, hdr, check_finite)
    out = LazyStateDict()
    out.reader = reader
    try:
        cls = _lazy_tensor_cls()
        for name, e in hdr.tensors.items():
            if e.nbytes <= eager_bytes:
                out[name] = reader.take(name)
            else:
                out[name] = cls(reader, name, shapes[name], torch_dtype(e.dtype))
    except BaseException:
        reader.close()
        raise
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
