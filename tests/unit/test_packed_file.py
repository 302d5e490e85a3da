"""The packed file of a quantized model (quant/checkpoint/packed_file.py), without ComfyUI: what is
written (keys, dtypes, metadata, ComfyUI's table), what a reader accepts, and every refusal naming
the file and the layer."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from quant.checkpoint import classify_checkpoint, read_header, read_packed_info
from quant.checkpoint import packed_file as pf
from quant.errors import CheckpointError
from quant.formats import get_format
from quant.selection.checkpoint_plan import plan_checkpoint, plan_file

N, K = 64, 128


def _contents(fmt: str, compute: str = "auto", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qa = get_format(fmt).quantize(torch.randn(N, K, generator=g))
    qb = get_format(fmt).quantize(torch.randn(N, N, generator=g))
    plain = {
        "blocks.0.a.bias": torch.randn(N, generator=g).bfloat16(),
        "head.weight": torch.randn(16, N, generator=g).bfloat16(),
        "norm.weight": torch.ones(N).bfloat16(),
    }
    packed = {"blocks.0.a": (qa, compute), "blocks.0.b": (qb, "w8a16" if "fp8" in fmt else "w4a16")}
    return pf.packed_file_contents(
        plain, packed, ["head"], family="wan21", dtype=torch.bfloat16, source="/models/wan.safetensors"
    ), (qa, qb)


def _write(tmp_path, fmt: str, name: str = "m.safetensors", **edit_meta):
    (tensors, meta), qws = _contents(fmt)
    meta.update(edit_meta)
    path = tmp_path / name
    pf.write_packed_file(path, tensors, meta)
    return path, tensors, meta, qws


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4", "fp8_e4m3fn_tensor", "fp8_e4m3fnuz"])
def test_written_file_holds_the_packed_bytes_and_reads_back(tmp_path, fmt):
    path, _, meta, (qa, qb) = _write(tmp_path, fmt)
    with safe_open(str(path), "pt") as f:  # the safetensors library reads it
        assert torch.equal(f.get_tensor("blocks.0.a.weight").view(torch.uint8), qa.qdata.view(torch.uint8))
        scale = f.get_tensor("blocks.0.a.weight_scale")
        assert scale.dtype == qa.scale.dtype and torch.equal(scale.reshape(-1), qa.scale.reshape(-1))
        assert f.get_tensor("blocks.0.a.weight").dtype == qa.qdata.dtype
        assert f.get_tensor("head.weight").dtype == torch.bfloat16
        assert f.metadata()[pf.META_VERSION] == str(pf.FORMAT_VERSION)
    info = read_packed_info(read_header(path))
    assert info is not None and info.format == fmt and info.family == "wan21" and info.dtype == "bfloat16"
    assert info.source == "wan.safetensors"  # the name only, never a server path
    assert info.kept == ("head",)
    assert info.layers["blocks.0.a"] == pf.PackedLayer("blocks.0.a", fmt, "auto", (N, K))
    assert info.layers["blocks.0.b"].compute in ("w8a16", "w4a16")
    assert info.plan_hash == pf.plan_hash(info.plan_text) == meta[pf.META_PLAN_HASH]
    assert info.plan_text.splitlines() == [
        f"blocks.0.a\t{fmt}\tauto",
        f"blocks.0.b\t{fmt}\t{info.layers['blocks.0.b'].compute}",
        "head\tkeep\t-",
    ]
    kind = classify_checkpoint(read_header(path))
    assert kind.kind == "online_quant" and kind.comfyui_loads
    assert kind.note.startswith(
        f"loaded pre-quantized (format {fmt}, file format version 1) — no quantization"
    )
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4", "fp8_e4m3fn_tensor"])
def test_comfyui_table_names_only_what_stock_comfyui_reads(tmp_path, fmt):
    """Per-tensor FP8 is ComfyUI's own float8_e4m3fn convention; every other format is named by a
    sentence that no ComfyUI format has, so stock ComfyUI stops at load and says which node to use."""
    _, _, meta, _ = _write(tmp_path, fmt)
    table = json.loads(meta[pf.COMFY_QUANT_META])
    assert set(table["layers"]) == {"blocks.0.a", "blocks.0.b"}  # the kept head is not in it
    for conf in table["layers"].values():
        assert conf["full_precision_matrix_mult"] is True
        if fmt == "fp8_e4m3fn_tensor":
            assert conf["format"] == "float8_e4m3fn"
        else:
            assert conf["format"].startswith(fmt) and pf.LOADER_NODE in conf["format"]


def test_plan_text_is_canonical():
    a = pf.plan_text([("b", "mxfp4", "auto"), ("a", None, ""), ("c", "mxfp4", "")])
    b = pf.plan_text([("c", "mxfp4", "auto"), ("b", "mxfp4", "auto"), ("a", None, "")])
    assert a == b == "a\tkeep\t-\nb\tmxfp4\tauto\nc\tmxfp4\tauto\n"
    assert pf.plan_hash(a) != pf.plan_hash(pf.plan_text([("a", "mxfp4", "auto")]))


def test_logical_shapes_and_plan_of_a_packed_file(tmp_path):
    path, _, _, _ = _write(tmp_path, "mxfp4")
    header = read_header(path)
    info = read_packed_info(header)
    shapes = pf.logical_shapes(info, header.shapes())
    assert shapes["blocks.0.a.weight"] == (N, K) and header.shapes()["blocks.0.a.weight"] == (N, K // 2)
    assert "blocks.0.a.weight_scale" not in shapes
    cp = plan_file(str(path), "mxfp4", "# auto\nblocks")  # the ignored layers do not apply
    assert cp.quantize and cp.plan.format == "mxfp4" and not cp.warnings
    assert {d.name: d.quantize for d in cp.plan.decisions} == {
        "blocks.0.a": True,
        "blocks.0.b": True,
        "head": False,
    }
    assert cp.plan.decision("blocks.0.a").in_features == K
    assert any("no quantization" in n for n in cp.notes)


@pytest.mark.parametrize(
    "asked,says",
    [("fp8_e4m3fn", "asked for, but this file was saved as mxfp4"), ("none", "'none' asked for")],
)
def test_a_request_for_another_format_loads_as_saved_with_a_warning(tmp_path, asked, says):
    path, _, _, _ = _write(tmp_path, "mxfp4")
    header = read_header(path)
    cp = plan_checkpoint(header.shapes(), asked, None, packed=read_packed_info(header), file=str(path))
    assert cp.quantize and cp.plan.format == "mxfp4"
    (w,) = cp.warnings
    assert says in w and "loaded as saved (mxfp4)" in w and "wan.safetensors" in w


def test_a_plain_file_is_not_a_packed_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"a.weight": torch.zeros(4, 4)}, str(tmp_path / "p.safetensors"), metadata={"x": "1"})
    assert read_packed_info(read_header(tmp_path / "p.safetensors")) is None


def _refused(path) -> str:
    with pytest.raises(CheckpointError) as e:
        read_packed_info(read_header(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: a file saved by 'Save Quantized Model (Online Quant)', but")
    return msg


def test_a_newer_format_version_is_refused(tmp_path):
    path, *_ = _write(tmp_path, "fp8_e4m3fn", **{pf.META_VERSION: "2"})
    assert "file format version 2, newer than this pack reads (up to 1): update" in _refused(path)
    path, *_ = _write(tmp_path, "fp8_e4m3fn", "v.safetensors", **{pf.META_VERSION: "one"})
    assert "is not a number" in _refused(path)


def test_edited_metadata_is_refused(tmp_path):
    _, _, meta, _ = _write(tmp_path, "fp8_e4m3fn")
    plan = meta[pf.META_PLAN].replace("blocks.0.a\tfp8_e4m3fn\tauto", "blocks.0.a\tkeep\t-")
    path, *_ = _write(tmp_path, "fp8_e4m3fn", "a.safetensors", **{pf.META_PLAN: plan})
    assert "does not match the plan's hash" in _refused(path)
    path, *_ = _write(
        tmp_path, "fp8_e4m3fn", "b.safetensors", **{pf.META_PLAN: plan, pf.META_PLAN_HASH: pf.plan_hash(plan)}
    )
    assert "lists layers its plan does not" in _refused(path)
    path, *_ = _write(tmp_path, "fp8_e4m3fn", "c.safetensors", **{pf.META_LAYERS: "{not json"})
    assert "not a valid layer table" in _refused(path)


def test_tensors_that_do_not_fit_their_format_are_refused(tmp_path):
    (tensors, meta), _ = _contents("mxfp4")
    tensors["blocks.0.a.weight_scale"] = tensors["blocks.0.a.weight_scale"][:, :2].contiguous()
    pf.write_packed_file(tmp_path / "s.safetensors", tensors, meta)
    msg = _refused(tmp_path / "s.safetensors")
    assert (
        "'blocks.0.a.weight_scale' is U8 [64, 2], but mxfp4 packs a [64, 128] weight as uint8 [64, 4]" in msg
    )
    del tensors["blocks.0.a.weight_scale"]
    pf.write_packed_file(tmp_path / "m.safetensors", tensors, meta)
    assert "tensor 'blocks.0.a.weight_scale' of layer 'blocks.0.a' is missing" in _refused(
        tmp_path / "m.safetensors"
    )


def test_an_unknown_format_is_refused(tmp_path):
    (tensors, meta), _ = _contents("fp8_e4m3fn")
    table = json.loads(meta[pf.META_LAYERS])
    table["blocks.0.a"]["format"] = "nvfp8_future"
    plan = meta[pf.META_PLAN].replace("blocks.0.a\tfp8_e4m3fn", "blocks.0.a\tnvfp8_future")
    meta.update(
        {pf.META_LAYERS: json.dumps(table), pf.META_PLAN: plan, pf.META_PLAN_HASH: pf.plan_hash(plan)}
    )
    pf.write_packed_file(tmp_path / "u.safetensors", tensors, meta)
    assert "layer 'blocks.0.a' is in format 'nvfp8_future', which this pack does not know" in _refused(
        tmp_path / "u.safetensors"
    )


def test_a_failed_write_leaves_no_file(tmp_path):
    (tensors, meta), _ = _contents("fp8_e4m3fn")
    tensors["shared"] = tensors["head.weight"]  # safetensors refuses tensors sharing memory
    with pytest.raises(RuntimeError):
        pf.write_packed_file(tmp_path / "f.safetensors", tensors, meta)
    assert os.listdir(tmp_path) == []


def test_a_plain_and_a_packed_tensor_of_one_name_is_a_bug():
    qw = get_format("fp8_e4m3fn").quantize(torch.randn(N, K))
    with pytest.raises(ValueError, match="both a plain and a packed tensor"):
        pf.packed_file_contents(
            {"a.weight": torch.zeros(N, K)}, {"a": (qw, "auto")}, [], family="generic", dtype=torch.bfloat16
        )
