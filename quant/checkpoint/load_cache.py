"""The quantized load cache (opt-in): packed files of earlier loads, found again by what makes two
loads the same, so a later load reads packed bytes instead of reading bf16 and quantizing.

A cache file is a packed file (packed_file.py) with one more metadata entry, the key it was
written for (`online_quant.cache_key`). The key is the source file's identity, the effective plan
and the file format version:
- the source: its name, size, modification time (ns) and the SHA-256 of its header bytes (the
  tensor names, dtypes, shapes and offsets): a file replaced or rewritten in place is a new key;
- the effective plan: `plan_hash` of every Linear's (name, format or keep, compute mode), so a
  comment-only edit of the ignored layers is the same key and any real change is another one.
A changed source or plan is therefore a miss, never a stale hit. A file whose key, header, plan
or tensors do not check out is reported by `lookup` as damaged (`CheckpointError`); the caller
ignores it, says so, and writes it again. The folder holds at most `max_bytes`: writing a file
evicts the least recently used ones (a hit refreshes a file's time), and a file larger than the
whole limit is not written. Nothing here ever opens the source file for writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .header import SafetensorsHeader
from .packed_file import (
    FORMAT_VERSION,
    PackedFileInfo,
    plan_hash,
    plan_text,
    read_packed_info,
    write_packed_file,
)

if TYPE_CHECKING:
    import torch

META_CACHE_KEY = "online_quant.cache_key"
DEFAULT_MAX_BYTES = 64 << 30
_NAME = re.compile(r"-[0-9a-f]{20}\.safetensors$")


@dataclass(frozen=True)
class CacheKey:
    """What makes two loads the same (see the module docstring)."""

    source: str  # the source file's name (not its path: a moved file with the same bytes is a miss)
    size: int
    mtime_ns: int
    header_sha256: str
    plan_sha256: str
    format_version: int = FORMAT_VERSION

    def text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def file_name(self) -> str:
        stem = os.path.splitext(self.source)[0][:80]
        return f"{stem}-{hashlib.sha256(self.text().encode()).hexdigest()[:20]}.safetensors"


def header_sha256(header: SafetensorsHeader) -> str:
    """SHA-256 of a safetensors file's first 8 + header_len bytes (read-only, positioned read)."""
    from .reader import _open_regular, _pread_exact

    fd, _ = _open_regular(header.path)
    with os.fdopen(fd, "rb", buffering=0) as f:
        return hashlib.sha256(_pread_exact(f, 0, header.data_start)).hexdigest()


def source_key(header: SafetensorsHeader, plan_entries: Iterable[tuple[str, str | None, str]]) -> CacheKey:
    """The key of loading the file of `header` with this effective plan: (layer, format or None
    for kept, compute mode) per Linear layer, as `packed_file.plan_text` takes them."""
    st = os.stat(header.path)
    if st.st_size != header.file_size:
        raise CheckpointError(
            f"{header.path}: file changed size since its header was read: it is being written",
            path=header.path,
        )
    return CacheKey(
        os.path.basename(header.path),
        st.st_size,
        st.st_mtime_ns,
        header_sha256(header),
        plan_hash(plan_text(plan_entries)),
    )


@dataclass(frozen=True)
class CacheHit:
    path: str
    header: SafetensorsHeader
    info: PackedFileInfo


class QuantizedCache:
    """One cache folder (created when first written) with a size limit in bytes."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.folder = os.fspath(folder)
        self.max_bytes = int(max_bytes)

    def path_for(self, key: CacheKey) -> str:
        return os.path.join(self.folder, key.file_name())

    def lookup(self, key: CacheKey) -> CacheHit | None:
        """The cache file of `key`, checked; None when there is none. A file that is there but does
        not check out (truncated, damaged, written for another key) raises CheckpointError."""
        from .reader import read_header

        path = self.path_for(key)
        if not os.path.exists(path):
            return None
        header = read_header(path)
        info = read_packed_info(header)
        if info is None or header.metadata.get(META_CACHE_KEY) != key.text():
            raise CheckpointError(
                f"{path}: not the cache file of this load (its key differs)",
                path=path,
                reason="its key differs",
            )
        return CacheHit(path, header, info)

    def touch(self, path: str) -> None:
        """Mark a file as just used (the least recently used files are evicted first)."""
        with contextlib.suppress(OSError):
            os.utime(path)

    def remove(self, key: CacheKey) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path_for(key))

    def entries(self) -> list[tuple[str, int, int]]:
        """(path, bytes, last use in ns) of the folder's cache files, least recently used first.
        Only files named as this cache names them and carrying a cache key count: nothing else in
        the folder is ever evicted."""
        from .reader import read_header

        out = []
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.folder):
                path = os.path.join(self.folder, name)
                if not _NAME.search(name) or not os.path.isfile(path):
                    continue
                try:
                    if META_CACHE_KEY not in read_header(path).metadata:
                        continue
                except CheckpointError:
                    pass  # a damaged cache file still takes room: it may be evicted
                st = os.stat(path)
                out.append((path, st.st_size, st.st_mtime_ns))
        return sorted(out, key=lambda e: e[2])

    def store(
        self,
        key: CacheKey,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        *,
        source: str,
    ) -> tuple[str | None, list[str]]:
        """Write the cache file of `key`, evicting least recently used files to stay within the
        limit. -> (path or None when not written, paths evicted). Refuses to write over `source`."""
        path = self.path_for(key)
        if os.path.realpath(path) == os.path.realpath(source):
            raise ValueError(f"{path}: the cache file would be the source file itself; not written")
        need = sum(t.numel() * t.element_size() for t in tensors.values())
        if need > self.max_bytes:
            return None, []
        evicted = []
        others = [e for e in self.entries() if e[0] != path]  # the file of this key is replaced
        used = sum(size for _, size, _ in others)
        for p, size, _ in others:
            if used + need <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
                evicted.append(p)
            used -= size
        os.makedirs(self.folder, exist_ok=True)
        write_packed_file(path, tensors, {**metadata, META_CACHE_KEY: key.text()})
        return path, evicted


__all__ = [
    "DEFAULT_MAX_BYTES",
    "META_CACHE_KEY",
    "CacheHit",
    "CacheKey",
    "QuantizedCache",
    "header_sha256",
    "source_key",
]
