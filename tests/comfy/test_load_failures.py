"""Loading through `nodes.loader.load_quantized` with a real ComfyUI: bad files give clear errors,
a failed load leaves nothing behind and the next load with corrected inputs works, the checkpoint
is never opened for writing, pre-quantized files load as they are with a note. (LoRA unpatching
and clone isolation are tested in tests/comfy/test_nodes_lora.py.)"""

from __future__ import annotations

import builtins
import gc
import hashlib
import os
import re

import helpers_models as hm
import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def loader(pack):
    hm.import_submodules(
        pack, "nodes.loader", "nodes.layouts", "nodes.ops", "quant.errors", "quant.formats",
        "quant.checkpoint",
    )
    return pack.nodes.loader


@pytest.fixture(scope="module")
def wan_file(comfyui_path, tmp_path_factory):
    return hm.save_model(hm.wan_model(seed=0), tmp_path_factory.mktemp("wanlf") / "wan_tiny.safetensors")


def _errors(pack):
    return pack.quant.errors


def _digest(path) -> tuple[int, str]:
    return os.stat(path).st_mtime_ns, hashlib.sha256(open(path, "rb").read()).hexdigest()


LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 10000000000\n"


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("lfs", "Git LFS pointer"),
        ("html", "HTML page"),
        ("gguf", "GGUF file renamed"),
        ("pickle", "pickle checkpoint"),
        ("empty", "is empty (0 bytes)"),
        ("short", "bytes short"),
        ("duplicate", "appears twice"),
        ("directory", "is a directory"),
        ("fifo", "named pipe"),
        ("dangling", "does not exist"),
    ],
)
def test_bad_files_are_checkpoint_errors_naming_the_file(pack, loader, wan_file, tmp_path, kind, expected):
    p = tmp_path / f"{kind}.safetensors"
    if kind == "lfs":
        p.write_bytes(LFS)
    elif kind == "html":
        p.write_bytes(b"<!DOCTYPE html><html><body>Access denied</body></html>")
    elif kind == "gguf":
        p.write_bytes(b"GGUF\x03\0\0\0" + b"\0" * 100)
    elif kind == "pickle":
        p.write_bytes(b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01u.")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "short":
        p.write_bytes(wan_file.read_bytes()[:-1])
    elif kind == "duplicate":
        entry = b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
        hdr = b"{" + entry + b"," + entry + b"}"
        p.write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\x01")
    elif kind == "directory":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "dangling":
        p.symlink_to(tmp_path / "missing.safetensors")
    with pytest.raises(_errors(pack).CheckpointError) as ei:
        loader.load_quantized(str(p), "fp8_e4m3fn", None)
    assert str(p) in str(ei.value) and expected in str(ei.value), str(ei.value)


def _variant(src, dst, edit) -> str:
    sd = load_file(str(src))
    edit(sd)
    save_file(sd, str(dst))
    return str(dst)


def test_missing_weight_names_the_layer(pack, loader, wan_file, tmp_path):
    p = _variant(wan_file, tmp_path / "missing.safetensors", lambda sd: sd.pop("blocks.1.ffn.0.weight"))
    with pytest.raises(Exception) as ei:
        loader.load_quantized(p, "fp8_e4m3fn", "")
    assert "blocks.1.ffn.0" in str(ei.value), str(ei.value)


def test_weight_shape_that_does_not_fit_names_the_layer(pack, loader, wan_file, tmp_path):
    def edit(sd):
        w = sd["blocks.0.ffn.0.weight"]
        sd["blocks.0.ffn.0.weight"] = w[:, : w.shape[1] // 2].contiguous()

    p = _variant(wan_file, tmp_path / "shape.safetensors", edit)
    with pytest.raises(Exception) as ei:
        loader.load_quantized(p, "fp8_e4m3fn", "")
    assert "blocks.0.ffn.0" in str(ei.value), str(ei.value)


def test_failed_load_leaves_nothing_and_corrected_load_works(pack, loader, wan_file, tmp_path):
    m = hm.wan_model(seed=5)
    with torch.no_grad():
        m.blocks[0].self_attn.q.weight[0, 0] = float("inf")
    bad = hm.save_model(m, tmp_path / "wan_inf.safetensors")
    created, restore = hm.spy_online_linears(pack)
    try:
        with pytest.raises(_errors(pack).NonFiniteWeightError, match=r"blocks\.0\.self_attn\.q"):
            loader.load_quantized(str(bad), "mxfp4", "")
        with pytest.raises(_errors(pack).PatternError):
            loader.load_quantized(str(wan_file), "fp8_e4m3fn", "re:(")
    finally:
        restore()
    gc.collect()
    assert all(r() is None for r in created), "a half-built model survived a failed load"
    # the same file with the bad layer allowed and kept loads (the report says so), and the good
    # file with a fixed pattern loads
    mp, rep = loader.load_quantized(str(bad), "mxfp4", "blocks.0.self_attn.q", allow_non_finite=True)
    assert "blocks.0.self_attn.q" in {r.name for r in rep.kept()}
    assert any("non-finite values allowed" in w and "blocks.0.self_attn.q.weight" in w for w in rep.warnings)
    mp2, rep2 = loader.load_quantized(str(wan_file), "fp8_e4m3fn", "re:blocks\\.0\\.")
    assert rep2.quantized() and all(not r.name.startswith("blocks.0.") for r in rep2.quantized())
    out = hm.run_diffusion_model(mp2, hm.wan_inputs())
    assert torch.isfinite(out).all()


def test_checkpoint_is_never_opened_for_writing(pack, loader, wan_file, monkeypatch):
    before = _digest(wan_file)
    os.chmod(wan_file, 0o444)
    target = os.path.realpath(wan_file)
    writes = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, mode="r", *a, **k):
        is_path = isinstance(file, (str, os.PathLike))
        if is_path and os.path.realpath(file) == target and set(mode) & set("wax+"):
            writes.append(("open", mode))
        return real_open(file, mode, *a, **k)

    def spy_os_open(path, flags, *a, **k):
        if os.path.realpath(path) == target and flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC):
            writes.append(("os.open", flags))
        return real_os_open(path, flags, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    try:
        for fmt in ("fp8_e4m3fn", "mxfp4", "none"):
            mp, _ = loader.load_quantized(str(wan_file), fmt, None)
            del mp
    finally:
        monkeypatch.undo()
        os.chmod(wan_file, 0o644)
    assert writes == []
    assert _digest(wan_file) == before


def test_prequantized_fp8_file_loads_as_is_with_a_note(pack, loader, wan_file, tmp_path):
    """fp8 weights (no scales): ComfyUI can load them; the loader must not quantize them again."""
    classify = pack.quant.checkpoint.classify_checkpoint

    def to_fp8(sd):
        for k in list(sd):
            if k.endswith(".weight") and sd[k].dim() == 2 and k.startswith("blocks."):
                sd[k] = sd[k].to(torch.float8_e4m3fn)

    p = _variant(wan_file, tmp_path / "wan_fp8.safetensors", to_fp8)
    kind = classify(pack.quant.checkpoint.read_header(p))
    assert kind.kind == "fp8" and kind.comfyui_loads
    try:
        mp, rep = loader.load_quantized(p, "fp8_e4m3fn", None)
    except _errors(pack).CheckpointError as e:  # a clear refusal is acceptable too
        assert "already quantized" in str(e)
        return
    text = " ".join(rep.notes + rep.warnings)
    assert "already quantized" in text, text
    assert not rep.quantized()


def test_packed_mxfp4_file_is_refused_clearly(pack, loader, wan_file, tmp_path):
    def pack_layer(sd):
        w = sd.pop("blocks.0.ffn.0.weight")
        n, k = w.shape
        sd["blocks.0.ffn.0.weight"] = torch.zeros(n, k // 2, dtype=torch.uint8)
        sd["blocks.0.ffn.0.weight_scale"] = torch.full((n, k // 32), 127, dtype=torch.uint8)

    p = _variant(wan_file, tmp_path / "wan_mx.safetensors", pack_layer)
    with pytest.raises(_errors(pack).CheckpointError) as ei:
        loader.load_quantized(p, "fp8_e4m3fn", None)
    assert "already quantized" in str(ei.value) or "blocks.0.ffn.0" in str(ei.value), str(ei.value)


def _truncate_during_load(comfy_path: str, repo: str, path: str, fmt: str, queue) -> None:
    """Child process: load `path`, truncating it to half when the first Linear starts loading."""
    import sys

    sys.path[:0] = [comfy_path, repo, os.path.join(repo, "tests", "support")]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from conftest import import_pack

    pack = import_pack()
    import helpers_models as hm_child

    hm_child.import_submodules(pack, "nodes.loader", "nodes.ops")
    cls = pack.nodes.ops.OnlineQuantLinear
    orig = cls._load_from_state_dict
    done = []

    def truncating(self, *a, **k):
        if not done:
            done.append(1)
            os.truncate(path, os.path.getsize(path) // 2)
        return orig(self, *a, **k)

    cls._load_from_state_dict = truncating
    try:
        pack.nodes.loader.load_quantized(path, fmt, "")
        queue.put("loaded")
    except Exception as e:  # noqa: BLE001 - report what was raised
        queue.put(f"{type(e).__name__}: {e}")


@pytest.mark.slow
def test_file_truncated_during_load_is_an_error_not_a_crash(comfyui_path, wan_file, tmp_path):
    """With mmap (safetensors' default) this kills the process with SIGBUS; it must raise."""
    import multiprocessing as mp
    import shutil
    import signal

    p = tmp_path / "wan_trunc.safetensors"
    shutil.copy(wan_file, p)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = ctx.Process(target=_truncate_during_load, args=(str(comfyui_path), repo, str(p), "fp8_e4m3fn", q))
    child.start()
    child.join(300)
    assert child.exitcode != -signal.SIGBUS, "the load was killed by SIGBUS (memory-mapped file truncated)"
    assert child.exitcode == 0, f"child exited with {child.exitcode}"
    msg = q.get(timeout=10)
    assert "CheckpointError" in msg or "file ended while reading" in msg, msg


def _truncate_prequantized_during_load(comfy_path: str, repo: str, path: str, queue) -> None:
    """Child process: load an already-quantized `path` (plain load through ComfyUI's own ops),
    truncating it to half just before ComfyUI builds the model from the state dict."""
    import sys

    sys.path[:0] = [comfy_path, repo, os.path.join(repo, "tests", "support")]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from conftest import import_pack

    pack = import_pack()
    import helpers_models as hm_child

    hm_child.import_submodules(pack, "nodes.loader")
    loader = pack.nodes.loader
    loader._EAGER_BYTES = 1024  # the tiny model's weights are read lazily, as a real model's are
    orig = loader.comfy.sd.load_diffusion_model_state_dict

    def truncating(*a, **k):
        os.truncate(path, os.path.getsize(path) // 2)
        return orig(*a, **k)

    loader.comfy.sd.load_diffusion_model_state_dict = truncating
    try:
        _, rep = loader.load_quantized(path, "fp8_e4m3fn", None)
        queue.put("loaded: " + " ".join(rep.notes))
    except Exception as e:  # noqa: BLE001 - report what was raised
        queue.put(f"{type(e).__name__}: {e}")


@pytest.mark.slow
def test_prequantized_file_truncated_during_load_is_an_error_not_a_crash(comfyui_path, wan_file, tmp_path):
    """Already-quantized files were memory-mapped by ComfyUI (SIGBUS on truncation): they are read
    with positioned reads too."""
    import multiprocessing as mp
    import signal

    def to_fp8(sd):
        for k in list(sd):
            if k.endswith(".weight") and sd[k].dim() == 2 and k.startswith("blocks."):
                sd[k] = sd[k].to(torch.float8_e4m3fn)

    p = _variant(wan_file, tmp_path / "wan_fp8_trunc.safetensors", to_fp8)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = ctx.Process(target=_truncate_prequantized_during_load, args=(str(comfyui_path), repo, p, q))
    child.start()
    child.join(300)
    assert child.exitcode != -signal.SIGBUS, "the load was killed by SIGBUS (memory-mapped file truncated)"
    assert child.exitcode == 0, f"child exited with {child.exitcode}"
    msg = q.get(timeout=10)
    assert msg.startswith("CheckpointError") and "file ended while reading" in msg, msg


def test_out_of_memory_while_quantizing_names_layer_and_size_and_next_load_works(
    pack, loader, wan_file, monkeypatch
):
    """torch.OutOfMemoryError inside one layer's quantization (simulated: no GPU here)."""
    ops = pack.nodes.ops
    real = ops.to_quantized_tensor

    def oom_on_ffn2(qw, *a, **k):
        if tuple(qw.shape) == (hm.wan_model().blocks[1].ffn[2].weight.shape):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(qw, *a, **k)

    monkeypatch.setattr(ops, "to_quantized_tensor", oom_on_ffn2)
    created, restore = hm.spy_online_linears(pack)
    try:
        with pytest.raises(_errors(pack).QuantizationOOMError) as ei:
            loader.load_quantized(str(wan_file), "fp8_e4m3fn", "")
    finally:
        restore()
        monkeypatch.undo()
    msg = str(ei.value)
    del ei  # its traceback holds the frames (and the half-built model) alive
    assert "ffn.2" in msg and "out of memory" in msg and "bytes" in msg, msg
    gc.collect()
    assert all(r() is None for r in created), "a half-built model survived the OOM"
    mp, rep = loader.load_quantized(str(wan_file), "fp8_e4m3fn", "")
    assert rep.quantized()


def test_weight_dtype_that_does_not_fit_names_the_layer(pack, loader, wan_file, tmp_path):
    def edit(sd):
        sd["blocks.0.ffn.0.weight"] = sd["blocks.0.ffn.0.weight"].to(torch.int32)

    p = _variant(wan_file, tmp_path / "dtype.safetensors", edit)
    with pytest.raises(Exception) as ei:
        loader.load_quantized(p, "fp8_e4m3fn", "")
    assert "blocks.0.ffn.0" in str(ei.value), f"{type(ei.value).__name__}: {ei.value}"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_checkpoint_is_not_held_open_after_the_load(pack, loader, wan_file):
    """The lazy state dict's file handle goes away with the load (a user can replace the file)."""
    mp, _ = loader.load_quantized(str(wan_file), "fp8_e4m3fn", "")
    gc.collect()
    assert _fds_on(wan_file) == []
    assert torch.isfinite(hm.run_diffusion_model(mp, hm.wan_inputs())).all()


def test_memory_bench_checkpoint_is_a_valid_wan22_5b_file(comfyui_path, tmp_path):
    """quant/bench/memory.py's synthetic file: ComfyUI's Wan 2.2 5B names/shapes, valid, detected."""
    from quant.bench import memory
    from quant.checkpoint import read_header
    from quant.models import detect_family

    shapes = memory.wan22_5b_shapes(1)
    p = tmp_path / "wan5b_1block.safetensors"
    size = memory.write_checkpoint(p, shapes)
    h = read_header(p)
    assert h.file_size == size and set(h.tensors) == set(shapes)
    assert all(h.tensors[k].shape == s for k, (s, _) in shapes.items())
    assert {e.dtype for e in h.tensors.values()} == {"BF16"}
    assert detect_family(list(h.shapes()), h.shapes()) == "wan22_5b"
    assert h.tensors["blocks.0.ffn.0.weight"].shape == (14336, 3072)
    st = memory._status_kib()
    assert not os.path.exists("/proc/self/status") or st.get("VmRSS", 0) > 0


# ---- non-finite values anywhere, not only in quantized weights -------------------------------


@pytest.mark.parametrize(
    "tensor,value,fmt,ignore",
    [
        ("blocks.0.self_attn.q.weight", float("-inf"), "fp8_e4m3fn", "blocks.0.self_attn.q"),  # kept
        ("blocks.1.ffn.0.bias", float("nan"), "mxfp4", ""),  # the bias of a quantized layer
        ("blocks.0.norm3.weight", float("inf"), "none", ""),  # not a Linear, plain load
    ],
    ids=["kept-weight", "quantized-bias", "norm-plain"],
)
def test_non_finite_tensor_anywhere_stops_the_load_naming_it(pack, loader, wan_file, tmp_path, tensor, value,
                                                             fmt, ignore):
    def edit(sd):
        if tensor not in sd:
            pytest.skip(f"{tensor} not in the tiny Wan")
        sd[tensor] = sd[tensor].clone()
        sd[tensor].view(-1)[0] = value

    p = _variant(wan_file, tmp_path / "nonfinite.safetensors", edit)
    with pytest.raises(_errors(pack).NonFiniteWeightError, match=re.escape(repr(tensor))) as ei:
        loader.load_quantized(p, fmt, ignore)
    assert "NaN or Inf" in str(ei.value)


def test_prequantized_fp8_file_with_nan_stops_the_load(pack, loader, wan_file, tmp_path):
    def to_fp8(sd):
        for k in list(sd):
            if k.endswith(".weight") and sd[k].dim() == 2 and k.startswith("blocks."):
                sd[k] = sd[k].to(torch.float8_e4m3fn)
        sd["blocks.1.ffn.2.weight"].view(torch.uint8).view(-1)[3] = 0x7F  # NaN in e4m3fn

    p = _variant(wan_file, tmp_path / "wan_fp8_nan.safetensors", to_fp8)
    with pytest.raises(_errors(pack).NonFiniteWeightError, match=r"blocks\.1\.ffn\.2\.weight"):
        loader.load_quantized(p, "fp8_e4m3fn", None)


# ---- bad shapes and orphan tensors are CheckpointErrors naming the tensor --------------------


def _with_header_edit(src: str, dst, edit) -> str:
    """Rewrite `src`'s JSON header with `edit(header_dict)` (data unchanged, offsets kept)."""
    import json

    with open(src, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    hdr = json.loads(raw[8 : 8 + n])
    edit(hdr)
    new = json.dumps(hdr).encode()
    with open(dst, "wb") as f:
        f.write(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    return str(dst)


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "none"])
def test_empty_tensor_with_a_huge_dimension_is_a_checkpoint_error(pack, loader, wan_file, tmp_path, fmt):
    def edit(hdr):
        end = max(v["data_offsets"][1] for k, v in hdr.items() if k != "__metadata__")
        hdr["extra.empty"] = {"dtype": "BF16", "shape": [0, 2**64 - 1], "data_offsets": [end, end]}

    p = _with_header_edit(wan_file, tmp_path / "huge_dim.safetensors", edit)
    with pytest.raises(_errors(pack).CheckpointError, match=r"extra\.empty.*too large for PyTorch"):
        loader.load_quantized(p, fmt, "")


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4", "none"])
def test_bias_without_its_weight_is_a_checkpoint_error(pack, loader, wan_file, tmp_path, fmt):
    p = _variant(wan_file, tmp_path / "orphan.safetensors", lambda sd: sd.pop("blocks.0.self_attn.o.weight"))
    match = r"blocks\.0\.self_attn\.o\.bias.*without its weight"
    with pytest.raises(_errors(pack).CheckpointError, match=match):
        loader.load_quantized(p, fmt, "")


# ---- a failed load lets go of the file and the half-built model at once ------------------------


def _fds_on(path) -> list[str]:
    target = os.path.realpath(path)
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                out.append(fd)
        except OSError:
            pass
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_failed_load_releases_the_file_and_model_without_a_gc(pack, loader, wan_file, tmp_path):
    """The exception is kept (as ComfyUI keeps it for its error report) and no garbage collection
    runs: the file must be closed and the half-built model gone all the same."""
    m = hm.wan_model(seed=7)
    with torch.no_grad():
        m.blocks[1].ffn[2].weight[0, 0] = float("nan")  # a late layer: most of the model is built
    bad = hm.save_model(m, tmp_path / "wan_late_nan.safetensors")
    created, restore = hm.spy_online_linears(pack)
    gc.collect()
    gc.disable()
    try:
        try:
            loader.load_quantized(str(bad), "fp8_e4m3fn", "")
        except _errors(pack).NonFiniteWeightError as e:
            kept = e  # noqa: F841 - held like ComfyUI holds the error it reports
        else:
            pytest.fail("the load did not fail")
        assert _fds_on(bad) == [], "the checkpoint is still open after the failed load"
        alive = [r for r in created if r() is not None]
        assert created and alive == [], f"{len(alive)} layers of the half-built model are still alive"
    finally:
        gc.enable()
        restore()


# ---- implausible files are refused from the header -------------------------------------------


def test_implausible_tensor_counts_are_refused_from_the_header(pack, loader, tmp_path):
    from helpers_sparse import write_sparse_safetensors

    many = write_sparse_safetensors(
        tmp_path / "many.safetensors", {f"b.{i}.weight": (2, 2) for i in range(60_000)}
    )
    with pytest.raises(_errors(pack).CheckpointError, match=r"60000 tensors.*not a diffusion model"):
        loader.load_quantized(str(many), "fp8_e4m3fn", "")
    huge = write_sparse_safetensors(tmp_path / "huge.sft", {"a.weight": (4, 4)}, pad_header_to=9 * 2**20)
    with pytest.raises(_errors(pack).CheckpointError, match=r"header.*not a diffusion model file"):
        loader.load_quantized(str(huge), "fp8_e4m3fn", "")


def test_weights_bound_for_the_quantizer_are_not_scanned_twice(pack, loader, wan_file, monkeypatch):
    """The host scans a tensor for NaN/Inf once, where it is read; a weight the quantizer takes is
    checked by the quantizer on its own device (above: its NaN still stops the load), not also here."""
    import quant.checkpoint.lazy as lazy

    scanned: list[str] = []
    real = lazy.all_finite

    def spy(t):
        scanned.append(t.shape)
        return real(t)

    monkeypatch.setattr(lazy, "all_finite", spy)
    _, rep = loader.load_quantized(str(wan_file), "fp8_e4m3fn", "")
    quantized = rep.quantized()
    assert quantized and len(scanned) > 0
    shapes = [tuple(s) for s in scanned]
    kept = [(k.out_features, k.in_features) for k in rep.kept()]
    for r in quantized:  # no 2-D scan of a quantized weight's shape beyond the kept layers of that shape
        shape = (r.out_features, r.in_features)
        assert shapes.count(shape) <= kept.count(shape)
