"""The loader's opt-in quantized cache (nodes/load_cache.py) with the real ComfyUI, one test per
rule: a hit reads packed weights (bit-identical, no quantization), a changed source or plan is a
miss, a comment-only edit is a hit, a damaged file is ignored with a warning and written again,
the folder keeps to its size limit by least-recent use, and the source file is never written."""

from __future__ import annotations

import hashlib
import os
import time

import helpers_models as hm
import pytest
import torch

pytestmark = pytest.mark.comfyui

comfy = None
HIT = "quantized cache: read "
MISS = "quantized cache: miss; wrote "


@pytest.fixture(scope="module")
def mods(pack):
    global comfy
    import comfy.model_management

    return hm.import_submodules(pack, "nodes.loader", "nodes.load_cache", "nodes.loader_node")


@pytest.fixture
def wan(comfyui_path, tmp_path):
    """A tiny Wan alone in its folder (tests change it, and check nothing else is written there)."""
    (tmp_path / "src").mkdir()
    return hm.save_model(hm.wan_model(seed=1), tmp_path / "src" / "wan_tiny.safetensors")


def _load(mods, path, cache_dir, fmt="mxfp4", text=None, dtype="bf16", **kw):
    with torch.inference_mode():
        mp, rep = mods.nodes.load_cache.load_cached(
            str(path), fmt, text, compute_dtype=dtype, folder=str(cache_dir), **kw
        )
        bits = {
            k: (v._qdata.reshape(-1).view(torch.uint8), v._params.scale.reshape(-1).view(torch.uint8))
            if hasattr(v, "_qdata")
            else v.reshape(-1).view(torch.uint8)
            for k, v in mp.model.diffusion_model.state_dict().items()
        }
        y = hm.run_diffusion_model(mp, hm.wan_inputs())
        comfy.model_management.unload_all_models()
    return rep, bits, y


def _same(a: dict, b: dict) -> bool:
    def flat(v):
        return v if isinstance(v, tuple) else (v,)

    return a.keys() == b.keys() and all(
        all(torch.equal(x, y) for x, y in zip(flat(a[k]), flat(b[k]), strict=True)) for k in a
    )


def _notes(rep) -> str:
    return "\n".join(rep.notes + rep.warnings)


def _files(cache_dir) -> list[str]:
    return sorted(p.name for p in cache_dir.glob("*.safetensors")) if cache_dir.exists() else []


def _digest(path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
def test_a_second_load_reads_the_packed_weights(mods, wan, tmp_path, fmt):
    cache = tmp_path / "cache"
    source = _digest(wan)
    rep1, bits1, y1 = _load(mods, wan, cache, fmt)
    assert MISS in _notes(rep1) and rep1.quantize_seconds > 0
    (name,) = _files(cache)
    rep2, bits2, y2 = _load(mods, wan, cache, fmt)
    assert f"{HIT}{name} — no quantization" in _notes(rep2)
    assert rep2.quantize_seconds == 0.0 and not rep2.warnings
    assert _same(bits1, bits2) and torch.equal(y1, y2)
    # the same model as an uncached load, reported with the same plan and reasons
    with torch.inference_mode():
        mp, rep = mods.nodes.loader.load_quantized(str(wan), fmt, None, compute_dtype="bf16")
        y = hm.run_diffusion_model(mp, hm.wan_inputs())
        comfy.model_management.unload_all_models()
    assert torch.equal(y, y2)
    assert [(r.name, r.reason) for r in rep.layers] == [(r.name, r.reason) for r in rep2.layers]
    assert rep2.model_file == "wan_tiny.safetensors"
    assert _digest(wan) == source  # the source file was only read
    assert _files(wan.parent) == ["wan_tiny.safetensors"]


def test_a_hit_does_not_depend_on_the_dtype_the_miss_ran_in(mods, wan, tmp_path):
    """The cache keeps the source's own kept tensors, not the fp32 copies of a load that ran in fp32."""
    cache = tmp_path / "cache"
    rep, _, _ = _load(mods, wan, cache, dtype="fp32")
    assert MISS in _notes(rep)
    rep, bits, y = _load(mods, wan, cache)
    assert HIT in _notes(rep)
    _, bits_ref, y_ref = _load(mods, wan, tmp_path / "other_cache")
    assert _same(bits, bits_ref) and torch.equal(y, y_ref)


def test_a_changed_source_is_a_miss(mods, wan, tmp_path):
    cache = tmp_path / "cache"
    _, bits1, y1 = _load(mods, wan, cache)
    hm.save_model(hm.wan_model(seed=2), wan)  # other weights, same names and shapes (same header)
    rep, bits2, y2 = _load(mods, wan, cache)
    assert MISS in _notes(rep) and HIT not in _notes(rep)
    assert not torch.equal(y1, y2) and len(_files(cache)) == 2
    st = wan.stat()
    os.utime(wan, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: a new identity
    rep, _, y3 = _load(mods, wan, cache)
    assert MISS in _notes(rep) and torch.equal(y2, y3)


def test_a_changed_plan_is_a_miss_and_a_comment_edit_a_hit(mods, wan, tmp_path):
    cache = tmp_path / "cache"
    rep, _, _ = _load(mods, wan, cache, text="# auto\n")
    assert MISS in _notes(rep)
    rep, _, _ = _load(mods, wan, cache, text="# auto\n# only a comment\n")
    assert HIT in _notes(rep)
    rep, _, _ = _load(mods, wan, cache, text="# auto\nblocks.0.ffn\n")
    assert MISS in _notes(rep)
    assert "blocks.0.ffn.0" in [r.name for r in rep.kept()]
    rep, _, _ = _load(mods, wan, cache, fmt="mxfp4_ocp", text="# auto\n")
    assert MISS in _notes(rep) and rep.format == "mxfp4_ocp"
    rep, _, _ = _load(mods, wan, cache, text="# auto\nweights-only: ffn\n")  # compute modes are the plan
    assert MISS in _notes(rep)
    assert len(_files(cache)) == 4


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _break_header(path):
    data = bytearray(path.read_bytes())
    data[8:12] = b"{{{{"
    path.write_bytes(bytes(data))


def _other_key(path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        meta = f.metadata()
    meta["online_quant.cache_key"] = meta["online_quant.cache_key"].replace('"size": ', '"size": 1')
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("damage", [_truncate, _break_header, _other_key])
def test_a_damaged_cache_file_is_ignored_with_a_warning_and_written_again(mods, wan, tmp_path, damage):
    cache = tmp_path / "cache"
    _, bits1, y1 = _load(mods, wan, cache)
    (name,) = _files(cache)
    damage(cache / name)
    rep, bits2, y2 = _load(mods, wan, cache)
    (w,) = rep.warnings
    assert w.startswith("quantized cache: ignored a damaged cache file (") and name in w
    assert MISS in _notes(rep) and _same(bits1, bits2) and torch.equal(y1, y2)
    rep, _, y3 = _load(mods, wan, cache)
    assert HIT in _notes(rep) and not rep.warnings and torch.equal(y1, y3)


def _nan_code(path, fmt):
    """Set one byte of the first packed weight to a NaN code (FP8 e4m3fn 0x7F; MXFP4's E2M1 codes
    have none, so its first block scale becomes E8M0's NaN 0xFF), keeping the file valid."""
    import json
    import struct

    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    suffix = ".weight" if fmt.startswith("fp8") else ".weight_scale"
    name = next(
        k for k, v in header.items() if k.endswith(suffix) and v["dtype"] in ("F8_E4M3", "U8", "F8_E8M0")
    )
    data[8 + n + header[name]["data_offsets"][0]] = 0x7F if fmt.startswith("fp8") else 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("lazy", [False, True], ids=["read_at_open", "read_as_layers_load"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
def test_nan_codes_in_a_cache_file_are_damage(mods, wan, tmp_path, monkeypatch, fmt, lazy):
    """A hit checks the packed bytes where they land (on a GPU, without a host scan): a NaN code
    in the data (FP8) or in a block scale (MXFP4, E8M0 stored as uint8) is damage. The tiny
    model's tensors are small enough to be read when the file opens; `lazy` makes every tensor
    wait for its layer, as a real model's large ones do."""
    if lazy:
        monkeypatch.setattr(mods.nodes.loader, "_EAGER_BYTES", 0)
    cache = tmp_path / "cache"
    _, bits1, y1 = _load(mods, wan, cache, fmt)
    (name,) = _files(cache)
    _nan_code(cache / name, fmt)
    rep, bits2, y2 = _load(mods, wan, cache, fmt)
    (w,) = rep.warnings
    assert w.startswith("quantized cache: ignored a damaged cache file (") and "NaN" in w, w
    assert MISS in _notes(rep) and _same(bits1, bits2) and torch.equal(y1, y2)


def test_the_folder_keeps_to_its_limit_least_recently_used_first(mods, wan, tmp_path):
    cache = tmp_path / "cache"
    texts = {"a": "# auto\n", "b": "# auto\nblocks.0.ffn\n", "c": "# auto\nblocks.1.ffn\n"}
    rep, _, _ = _load(mods, wan, cache, text=texts["a"])
    (a,) = _files(cache)
    size = (cache / a).stat().st_size
    limit = int(size * 2.5)  # room for two files
    names = {"a": a}
    for k in ("b", "a", "c"):  # a is used again after b: b is the least recently used when c comes
        time.sleep(0.05)  # distinct modification times, which record the last use
        before = set(_files(cache))
        rep, _, _ = _load(mods, wan, cache, text=texts[k], max_bytes=limit)
        names.setdefault(k, next(iter(set(_files(cache)) - before), None))
    assert "evicted 1 least recently used file(s)" in _notes(rep)
    assert _files(cache) == sorted([names["a"], names["c"]])
    assert sum(p.stat().st_size for p in cache.iterdir()) <= limit
    rep, _, _ = _load(mods, wan, cache, text=texts["b"], max_bytes=100)
    assert "not written (the file would take" in _notes(rep) and "ONLINE_QUANT_CACHE_GB" in _notes(rep)


@pytest.mark.parametrize(
    "fmt,kw,why",
    [
        ("none", {}, "quantization none"),
        ("mxfp4", {"keep_sensitive": "worst 5%"}, "keep_sensitive chooses layers"),
    ],
)
def test_loads_the_cache_cannot_serve_say_why(mods, wan, tmp_path, fmt, kw, why):
    rep, _, _ = _load(mods, wan, tmp_path / "cache", fmt, **kw)
    assert f"quantized cache: not used ({why}" in _notes(rep)
    assert _files(tmp_path / "cache") == []


def test_the_node_input_is_off_by_default_and_the_folder_is_comfyuis(mods):
    import folder_paths

    schema = mods.nodes.loader_node.OnlineQuantDiffusionLoader.define_schema()
    (inp,) = [i for i in schema.inputs if i.id == "quantized_cache"]
    assert inp.default is False and inp.optional
    folder = mods.nodes.load_cache.cache_folder()
    assert folder == os.path.join(folder_paths.models_dir, "online_quant_cache")
    assert folder_paths.get_folder_paths("online_quant_cache")[0] == folder

