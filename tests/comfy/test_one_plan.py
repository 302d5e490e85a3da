"""One plan for every entry point: the loader, the web preview and the CLI, run on the same files as
users have them, either build the same plan or refuse with the same message."""

from __future__ import annotations

import importlib
import json

import helpers_models as hm
import pytest
import torch
from helpers_sparse import write_sparse_safetensors
from safetensors.torch import save_file

from quant import cli
from quant.models import reference_shapes

TEXTS = [None, "# auto\nblocks.1.ffn.0\n", ""]


@pytest.fixture(scope="module")
def mods(pack):
    hm.import_submodules(pack, "nodes.loader", "nodes.routes", "quant.errors")
    return pack.nodes.loader, pack.nodes.routes


def _wan_sd() -> dict[str, torch.Tensor]:
    return {
        k: v.detach().to(torch.bfloat16).contiguous() for k, v in hm.wan_model(seed=0).state_dict().items()
    }


def _renamed(shapes: dict, renames: list[tuple[str, str]]) -> dict:
    out = {}
    for k, v in shapes.items():
        for a, b in renames:
            k = k.replace(a, b)
        out[k] = v
    return out


@pytest.fixture(scope="module")
def files(comfyui_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("variants")
    sd = _wan_sd()
    out = {}
    save_file(sd, str(d / "repackaged.safetensors"))
    out["repackaged"] = d / "repackaged.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, str(d / "prefixed.safetensors"))
    out["model.diffusion_model. prefix"] = d / "prefixed.safetensors"
    save_file({f"diffusion_model.{k}": v for k, v in sd.items()}, str(d / "bare_prefix.safetensors"))
    out["bare diffusion_model. prefix"] = d / "bare_prefix.safetensors"
    z = _renamed(
        reference_shapes("zimage"),
        [("x_embedder.", "all_x_embedder.2-1."), ("attention.qkv.", "attention.to_q.")],
    )
    out["diffusers Z-Image"] = write_sparse_safetensors(d / "zimage_diffusers.safetensors", z)
    w = _renamed(
        reference_shapes("wan22_5b"),
        [
            ("self_attn.q.", "attn1.to_q."),
            ("ffn.0.", "ffn.net.0.proj."),
            ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
        ],
    )
    out["diffusers Wan"] = write_sparse_safetensors(d / "wan_diffusers.safetensors", w)
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 else v) for k, v in sd.items()}
    save_file(fp8, str(d / "plain_fp8.safetensors"))
    out["plain F8_E4M3"] = d / "plain_fp8.safetensors"
    scaled = dict(fp8)
    scaled.update(
        {k[: -len("weight")] + "scale_weight": torch.ones(()) for k, v in sd.items() if v.dim() == 2}
    )
    scaled["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(scaled, str(d / "scaled_fp8.safetensors"))
    out["scaled_fp8"] = d / "scaled_fp8.safetensors"
    mx = {k: v for k, v in sd.items() if v.dim() != 2}
    mx.update(
        {
            k: torch.zeros(v.shape[0], v.shape[1] // 2, dtype=torch.uint8)
            for k, v in sd.items()
            if v.dim() == 2
        }
    )
    mx.update(
        {
            k + "_scale": torch.zeros(v.shape[0], v.shape[1] // 32, dtype=torch.uint8)
            for k, v in sd.items()
            if v.dim() == 2
        }
    )
    save_file(mx, str(d / "packed_mxfp4.safetensors"))
    out["packed MXFP4"] = d / "packed_mxfp4.safetensors"
    out["saved by Save Quantized Model"] = _write_saved_mxfp4(sd, d / "saved_mxfp4.safetensors")
    return out


def _write_saved_mxfp4(sd: dict, path):
    """A file as Save Quantized Model writes it: the Linear weights of 256 outputs or more packed
    as MXFP4, the rest kept (quant/checkpoint/packed_file.py)."""
    from quant.checkpoint.packed_file import packed_file_contents, write_packed_file
    from quant.formats import get_format

    linear = {k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2}
    packed = {
        n: (get_format("mxfp4").quantize(sd[f"{n}.weight"]), "auto")
        for n in linear
        if sd[f"{n}.weight"].shape[0] >= 256
    }
    plain = {k: v for k, v in sd.items() if k[: -len(".weight")] not in packed}
    tensors, meta = packed_file_contents(
        plain, packed, linear - set(packed), family="wan21", dtype=torch.bfloat16
    )
    write_packed_file(path, tensors, meta)
    return path


def _from_cli(path, fmt, text, capsys) -> tuple[str, object]:
    argv = ["plan", str(path), "--format", fmt, "--json"] + ([] if text is None else ["--ignore", text])
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    if rc:
        return "refused", err.strip().removeprefix("error: ")
    d = json.loads(out)
    return "plan", (sorted(x["name"] for x in d["decisions"] if x["quantize"]), d["notes"])


def _from_route(routes, path, fmt, text) -> tuple[str, object]:
    try:
        info = routes._read_header_info(str(path), path.name)
        body = routes._plan_json(info, path.name, fmt, text, 256)
    except routes.RouteError as e:
        return "refused", str(e)
    return "plan", (sorted(x["name"] for x in body["decisions"] if x["quantize"]), body["notes"])


def _from_loader(loader, path, fmt, text) -> tuple[str, object]:
    try:
        mp, rep = loader.load_quantized(str(path), fmt, text)
    except Exception as e:  # noqa: BLE001 - the message is what is compared
        return "refused", str(e)
    quantized = sorted(r.name for r in rep.layers if r.quantized)
    return "plan", (quantized, [n for n in rep.notes if "loaded" in n or "family" in n or "generic" in n])


VARIANTS = [
    "repackaged",
    "model.diffusion_model. prefix",
    "bare diffusion_model. prefix",
    "diffusers Z-Image",
    "diffusers Wan",
    "plain F8_E4M3",
    "scaled_fp8",
    "packed MXFP4",
    "saved by Save Quantized Model",
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_loader_preview_and_cli_agree(variant, files, mods, capsys):
    loader, routes = mods
    path = files[variant]
    for text in TEXTS[: 2 if variant in ("repackaged", "model.diffusion_model. prefix") else 1]:
        got_cli = _from_cli(path, "fp8_e4m3fn", text, capsys)
        got_route = _from_route(routes, path, "fp8_e4m3fn", text)
        got_loader = _from_loader(loader, path, "fp8_e4m3fn", text)
        kinds = {got_cli[0], got_route[0], got_loader[0]}
        assert len(kinds) == 1, (variant, got_cli, got_route, got_loader)
        if got_cli[0] == "refused":
            # the same reason; the route never echoes the server path, so compare what follows it
            why = got_route[1].split(": ", 1)[1]
            assert why in got_cli[1] and why in got_loader[1], (got_cli, got_route, got_loader)
        else:
            assert got_cli[1][0] == got_route[1][0] == got_loader[1][0], variant
            assert got_cli[1][1] == got_route[1][1], variant


def test_what_each_variant_does(files, mods, capsys):
    """The behaviour per file variant, as a table the closing note quotes."""
    _, routes = mods
    got = {v: _from_route(routes, files[v], "fp8_e4m3fn", None) for v in VARIANTS}
    assert got["repackaged"][0] == got["model.diffusion_model. prefix"][0] == "plan"
    assert got["repackaged"][1][0] and got["repackaged"][1] == got["model.diffusion_model. prefix"][1]
    for v in ("bare diffusion_model. prefix", "diffusers Z-Image", "diffusers Wan", "packed MXFP4"):
        assert got[v][0] == "refused", v
    assert "Comfy-Org" in got["diffusers Z-Image"][1] and "z_image_turbo_bf16" in got["diffusers Z-Image"][1]
    assert "Comfy-Org" in got["diffusers Wan"][1]
    saved = got["saved by Save Quantized Model"]
    assert saved[0] == "plan" and "blocks.0.ffn.0" in saved[1][0] and "head.head" not in saved[1][0]
    assert saved[1][1][0].startswith("loaded pre-quantized (format mxfp4, file format version 1)")
    for v in ("plain F8_E4M3", "scaled_fp8"):
        assert (
            got[v][0] == "plan" and got[v][1][0] == [] and any("loaded as it is" in n for n in got[v][1][1])
        )


def test_forced_family_that_matches_nothing_warns(files, capsys):
    rc = cli.main(["plan", str(files["repackaged"]), "--family", "zimage"])
    out, _ = capsys.readouterr()
    assert rc == 0 and "warning: none of the 'zimage' default patterns matches" in out


def test_pattern_errors_name_the_users_line_in_all_three(files, mods, capsys):
    loader, routes = mods
    path, text = files["repackaged"], "# auto\n\nre:(("
    kind, msg = _from_cli(path, "fp8_e4m3fn", text, capsys)
    assert kind == "refused" and "(line 3)" in msg
    kind, msg = _from_route(routes, path, "fp8_e4m3fn", text)
    assert kind == "refused" and "(line 3)" in msg
    kind, msg = _from_loader(loader, path, "fp8_e4m3fn", text)
    assert kind == "refused" and "(line 3)" in msg


def test_module_imports():  # the entry is plain quant/, importable without ComfyUI
    assert importlib.import_module("quant.selection.checkpoint_plan").plan_checkpoint
