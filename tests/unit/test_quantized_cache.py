"""The quantized load cache's own rules (quant/checkpoint/load_cache.py), without ComfyUI: the key,
lookups of missing, damaged and foreign files, the size limit by least-recent use, and that
nothing but its own files is ever removed and the source is never written."""

from __future__ import annotations

import os
import time

import pytest
import torch
from safetensors.torch import save_file

from quant.checkpoint import load_cache as lc
from quant.checkpoint import packed_file as pf
from quant.checkpoint import read_header
from quant.errors import CheckpointError
from quant.formats import get_format

ENTRIES = [("a", "mxfp4", "auto"), ("b", None, "")]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.randn(64, 64), "b.weight": torch.randn(64, 64)}, str(path))
    return path


def _contents(n: int = 64):
    qw = get_format("mxfp4").quantize(torch.randn(n, 64))
    return pf.packed_file_contents(
        {"b.weight": torch.zeros(n, 64)}, {"a": (qw, "auto")}, ["b"], family="generic", dtype=torch.float32
    )


def _key(source, entries=ENTRIES) -> lc.CacheKey:
    return lc.source_key(read_header(source), entries)


def test_the_key_follows_the_source_and_the_plan(source):
    k = _key(source)
    assert k == _key(source) and k.source == "model.safetensors" and k.size == source.stat().st_size
    assert k.file_name().startswith("model-") and k.file_name().endswith(".safetensors")
    assert _key(source, [("a", "mxfp4", "w4a16"), ("b", None, "")]) != k  # a compute mode is the plan
    assert _key(source, [("a", None, ""), ("b", None, "")]).file_name() != k.file_name()
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert _key(source).mtime_ns != k.mtime_ns and _key(source).file_name() != k.file_name()
    save_file({"a.weight": torch.randn(64, 64), "c.weight": torch.randn(64, 64)}, str(source))
    assert _key(source).header_sha256 != k.header_sha256


def test_store_then_lookup_then_a_damaged_or_foreign_file(source, tmp_path):
    cache = lc.QuantizedCache(tmp_path / "cache")
    key = _key(source)
    assert cache.lookup(key) is None
    tensors, meta = _contents()
    path, evicted = cache.store(key, tensors, meta, source=str(source))
    assert evicted == [] and path == cache.path_for(key)
    hit = cache.lookup(key)
    assert hit.path == path and hit.info.layers["a"].format == "mxfp4"
    assert hit.header.metadata[lc.META_CACHE_KEY] == key.text()
    other = lc.CacheKey(key.source, key.size, key.mtime_ns, key.header_sha256, "0" * 64)
    os.replace(path, cache.path_for(other))  # a file under another key's name
    with pytest.raises(CheckpointError, match="its key differs"):
        cache.lookup(other)
    with open(cache.path_for(other), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError):
        cache.lookup(other)
    cache.remove(other)
    assert cache.lookup(other) is None


def test_store_evicts_least_recently_used_and_only_its_own_files(source, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    foreign = folder / "users-0123456789abcdef0123.safetensors"  # named like a cache file, no key
    save_file({"x": torch.zeros(4096)}, str(foreign))
    (folder / "notes.txt").write_text("kept")
    tensors, meta = _contents()
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    cache = lc.QuantizedCache(folder, max_bytes=int(size * 2.5))
    keys = [_key(source, [("a", "mxfp4", c), ("b", None, "")]) for c in ("auto", "w4a16", "w4a8")]
    cache.store(keys[0], tensors, meta, source=str(source))
    time.sleep(0.02)  # distinct modification times: they record the last use
    cache.store(keys[1], tensors, meta, source=str(source))
    time.sleep(0.02)
    cache.touch(cache.path_for(keys[0]))  # a hit: keys[1] is now the least recently used
    time.sleep(0.02)
    _, evicted = cache.store(keys[2], tensors, meta, source=str(source))
    assert evicted == [cache.path_for(keys[1])]
    assert [os.path.basename(p) for p, *_ in cache.entries()] == [keys[0].file_name(), keys[2].file_name()]
    assert foreign.exists() and (folder / "notes.txt").read_text() == "kept"
    small = lc.QuantizedCache(folder, max_bytes=size - 1)
    assert small.store(keys[1], tensors, meta, source=str(source)) == (None, [])
    assert not os.path.exists(small.path_for(keys[1]))


def test_the_source_is_never_the_cache_file(source):
    cache = lc.QuantizedCache(source.parent)
    key = _key(source)
    before = source.read_bytes()
    os.replace(source, cache.path_for(key))  # a source that happens to sit where the cache file goes
    tensors, meta = _contents()
    with pytest.raises(ValueError, match="would be the source file itself"):
        cache.store(key, tensors, meta, source=cache.path_for(key))
    with open(cache.path_for(key), "rb") as f:
        assert f.read() == before
