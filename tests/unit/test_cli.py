"""`python -m quant`: the embedded default run and `plan` on a checkpoint (quant/cli.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quant import cli

REPO = Path(__file__).resolve().parents[2]


def small_wan(path: Path, dim: int = 256, blocks: int = 2, head_out: int = 64) -> Path:
    """A small Wan-shaped checkpoint (detected as Wan: head.modulation), ComfyUI prefix."""
    g = torch.Generator().manual_seed(0)
    t = {}

    def lin(name, o, i):
        t[f"model.diffusion_model.{name}.weight"] = (torch.randn(o, i, generator=g) * 0.02).to(torch.bfloat16)
        t[f"model.diffusion_model.{name}.bias"] = torch.zeros(o, dtype=torch.bfloat16)

    lin("text_embedding.0", dim, 4096)
    lin("text_embedding.2", dim, dim)
    lin("time_embedding.0", dim, 256)
    lin("time_embedding.2", dim, dim)
    lin("time_projection.1", 6 * dim, dim)
    for b in range(blocks):
        for a in ("self_attn", "cross_attn"):
            for x in "qkvo":
                lin(f"blocks.{b}.{a}.{x}", dim, dim)
        lin(f"blocks.{b}.ffn.0", 4 * dim, dim)
        lin(f"blocks.{b}.ffn.2", dim, 4 * dim)
        t[f"model.diffusion_model.blocks.{b}.norm3.weight"] = torch.ones(dim, dtype=torch.bfloat16)
    lin("head.head", head_out, dim)
    t["model.diffusion_model.head.modulation"] = torch.zeros(1, 2, dim, dtype=torch.bfloat16)
    t["model.diffusion_model.patch_embedding.weight"] = torch.zeros(dim, 16, 1, 2, 2, dtype=torch.bfloat16)
    save_file(t, str(path))
    return path


def run_main(args, capsys):
    rc = cli.main(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def wan_file(tmp_path):
    return small_wan(tmp_path / "wan.safetensors")


def test_plan_text_defaults(wan_file, capsys):
    rc, out, err = run_main(["plan", str(wan_file), "--format", "mxfp4"], capsys)
    assert rc == 0, err
    assert "[wan21]" in out and "format mxfp4" in out
    # attention with weights only (bf16 activations), the FFN with quantized activations
    assert "quantize (weights only, activations in the compute dtype):" in out
    assert "blocks.{0-1}.self_attn.q  (2 layers)" in out and "blocks.{0-1}.ffn.{0,2}  (4 layers)" in out
    assert "ignored by pattern 'head' (the wan21 defaults)" in out
    assert "warning" not in out  # the I2V-only default line is left out for a T2V model


def test_plan_json(wan_file, capsys):
    rc, out, _ = run_main(
        ["plan", str(wan_file), "--format", "fp8_e4m3fn", "--ignore", "ffn.2\nnope", "--json"], capsys
    )
    assert rc == 0
    d = json.loads(out)
    assert d["family"] == "wan21" and d["format"] == "fp8_e4m3fn"
    assert d["warnings"] == ["pattern 'nope' (line 2) matched no layer"]
    by = {x["name"]: x for x in d["decisions"]}
    assert by["blocks.1.ffn.2"]["quantize"] is False and by["blocks.1.ffn.2"]["line"] == 1
    assert by["blocks.1.self_attn.q"]["quantize"] is True  # user text replaces the defaults
    assert by["head.head"]["source"] == "size"
    assert d["counts"]["layers"] == 5 + 2 * 10 + 1
    assert d["bytes_after"] < d["bytes_before"]
    assert "self_attn" in d["default_ignore_text"]


def test_plan_measure_streams_sqnr(wan_file, capsys, monkeypatch):
    import quant.cli as safetensors_header  # the CLI reads tensors through its iter_tensors

    seen = []
    real_iter = safetensors_header.iter_tensors

    def spy(path, names=None, **kw):
        for name, t in real_iter(path, names, **kw):
            seen.append(name)
            yield name, t

    monkeypatch.setattr(safetensors_header, "iter_tensors", spy)
    rc, out, err = run_main(
        ["plan", str(wan_file), "--format", "mxfp4", "--ignore", "", "--measure", "--json"], capsys
    )
    assert rc == 0, err
    d = json.loads(out)
    q = [x["name"] for x in d["decisions"] if x["quantize"]]
    assert sorted(d["sqnr_db"]) == sorted(q)
    # only the quantized layers' weights were read from the file, one at a time
    assert sorted(seen) == sorted(f"model.diffusion_model.{n}.weight" for n in q)
    for v in d["sqnr_db"].values():
        assert 12 < v < 25  # MXFP4 on Gaussian weights: about 17-18 dB
    rc, out, _ = run_main(["plan", str(wan_file), "--format", "fp8_e4m3fn", "--measure"], capsys)
    assert rc == 0 and "weight SQNR per quantized layer" in out and "mean" in out


def test_plan_ignore_from_file(wan_file, tmp_path, capsys):
    f = tmp_path / "ignore.txt"
    f.write_text("# mine\nffn  # all of it\n")
    rc, out, _ = run_main(["plan", str(wan_file), "--ignore", f"@{f}", "--json"], capsys)
    d = json.loads(out)
    assert rc == 0 and not any(x["quantize"] for x in d["decisions"] if ".ffn." in x["name"])


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--ignore", "re:a(b"], "'re:a(b' (line 1) is not a valid regular expression"),
        (["--format", "int3"], "unknown quantization format 'int3'"),
        (["--ignore", "@/nonexistent/ignore.txt"], "cannot read"),
        (["--min-out", "-1"], "--min-out"),
    ],
)
def test_plan_user_errors_exit_2_without_traceback(wan_file, capsys, args, fragment):
    rc, out, err = run_main(["plan", str(wan_file), *args], capsys)
    assert rc == 2
    assert fragment in err and "Traceback" not in err


def test_plan_bad_files(tmp_path, capsys):
    rc, _, err = run_main(["plan", str(tmp_path / "missing.safetensors")], capsys)
    assert rc == 2 and "missing.safetensors" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    rc, _, err = run_main(["plan", str(junk)], capsys)
    assert rc == 2 and "junk.safetensors" in err
    empty = tmp_path / "norms.safetensors"
    save_file({"norm.weight": torch.ones(8)}, str(empty))
    rc, _, err = run_main(["plan", str(empty)], capsys)
    assert rc == 2 and "no Linear weights" in err


def test_plan_fused_error_on_zimage_reference(capsys):
    rc, _, err = run_main(["plan", "--reference", "zimage", "--ignore", "to_q"], capsys)
    assert rc == 2 and "fused" in err and "attention.qkv" in err


def test_plan_reference_zimage(capsys):
    rc, out, _ = run_main(["plan", "--reference", "zimage", "--format", "mxfp4"], capsys)
    assert rc == 0
    assert "208 Linear layers: quantize 170" in out and "11.46 GiB -> 3.23 GiB" in out


def test_defaults_command(capsys):
    rc, out, _ = run_main(["defaults", "zimage"], capsys)
    assert rc == 0 and out.splitlines()[1].startswith("x_embedder")


@pytest.mark.slow
def test_default_run_subprocess():
    """`python -m quant` with no arguments: the embedded default, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-m", "quant", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "Linear weights, full-size Z-Image (208 layers): 11.46 GiB -> 5.86 GiB" in text
    assert "plan for full-size" not in text and "why:" not in text  # the long detail is behind --verbose
    res = json.loads(text[text.index("\n{") + 1 :])
    fp8, mx = res["formats"]["fp8_e4m3fn"], res["formats"]["mxfp4"]
    for r_ in (fp8, mx):
        assert r_["bytes_after"] < r_["bytes_before"]
        assert math.isfinite(r_["relative_l2"]) and r_["relative_l2"] > 0
    # MXFP4 (4.25 bits) is smaller and less accurate than FP8 (8 bits + scales)
    assert mx["bytes_after"] < fp8["bytes_after"]
    assert fp8["relative_l2"] < mx["relative_l2"] < 0.3
    assert fp8["relative_l2"] < 0.06


def test_default_run_verbose_prints_the_plan_and_why(capsys):
    rc, out, err = run_main(["--verbose", "--formats", "fp8_e4m3fn", "--latent", "4"], capsys)
    assert rc == 0, err
    assert "plan for full-size Z-Image (208 Linear layers)" in out and "quantize 170" in out
    assert "  why: " in out


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
def test_chunked_weight_sqnr_matches_quality_sqnr(fmt):
    from quant.formats import get_format
    from quant.quality import sqnr_db

    w = torch.randn(300, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    f = get_format(fmt)
    qw = f.quantize(w)
    whole = sqnr_db(w, qw.dequantize(torch.float32))
    assert cli._weight_sqnr_rows(f, w, qw, rows_elems=256 * 7) == pytest.approx(whole, abs=1e-3)
    assert cli._weight_sqnr_rows(f, torch.zeros(64, 64), f.quantize(torch.zeros(64, 64))) == math.inf


def test_plan_of_prequantized_files_says_what_the_loader_does(tmp_path, capsys):
    """A plain FP8 file ComfyUI reads is loaded as it is (every layer kept, a note), as the loader
    does; packed MXFP4 codes it cannot read are refused with the loader's message."""
    p = tmp_path / "fp8.safetensors"
    save_file({"blocks.0.ffn.0.weight": torch.zeros(256, 256).to(torch.float8_e4m3fn)}, str(p))
    rc, out, err = run_main(["plan", str(p)], capsys)
    assert rc == 0, err
    assert "quantize 0" in out and "already quantized" in out and "loaded as it is" in out
    q = tmp_path / "mxfp4.safetensors"
    codes = torch.zeros(256, 128, dtype=torch.uint8)
    save_file({"x.weight": codes, "x.weight_scale": torch.zeros(256, 8, dtype=torch.uint8)}, str(q))
    rc, _, err = run_main(["plan", str(q)], capsys)
    assert (
        rc == 2 and "already quantized" in err and "ComfyUI cannot load it" in err and "Traceback" not in err
    )


def sparse_checkpoint(path: Path, shapes: dict) -> Path:
    """A full-size bf16 safetensors file whose data section is a hole (sparse): real header,
    real size (tens of GB), no disk used. Only a header-only reader can plan it quickly."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        entry = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        header[f"model.diffusion_model.{name}"] = entry
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return path


def test_plan_full_size_sparse_file_reads_header_only(tmp_path, capsys, monkeypatch):
    import quant.cli as safetensors_header  # the CLI reads tensors through its iter_tensors
    from quant.models import reference_shapes

    p = sparse_checkpoint(tmp_path / "wan14b.safetensors", reference_shapes("wan21_t2v_14b"))
    assert p.stat().st_size > 28e9

    def no_data(*a, **k):
        raise AssertionError("plan without --measure must not read tensor data")

    monkeypatch.setattr(safetensors_header, "iter_tensors", no_data)
    rc, out, err = run_main(["plan", str(p), "--format", "mxfp4"], capsys)
    assert rc == 0, err
    assert "[wan21]" in out and "406 Linear layers: quantize 400" in out and "26.60 GiB -> 7.38 GiB" in out
