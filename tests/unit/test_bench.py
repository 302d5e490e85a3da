"""`python -m quant.bench --quick` runs on the CPU (CI) and writes JSON + Markdown with the rows
and fields the README table is built from. Timings on the CPU mean nothing and are not checked."""

from __future__ import annotations

import json

import pytest
from torch_caps import has_cpu_scaled_mm

from quant.bench.__main__ import main


def test_bench_quick_gemm(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "ONLINEQUANT_DISABLE_TRITON", "1"
    )  # the kernels are tested elsewhere; here the references run
    assert main(["--quick", "--sections", "gemm,nosuch", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["env"]["torch"] and "triton" in data["env"]
    assert "nosuch" in data["skipped"]
    rows = data["results"]["gemm"]
    # paths that are `torch._scaled_mm` itself fail (and are reported) where this PyTorch's CPU
    # build has no row-wise `_scaled_mm`; everything else runs on any CPU
    scaled_mm = {
        "comfy_fp8_unscaled",
        "ours_fp8_rowwise",
        "ours_fp8_rowwise_fastaccum",
        "ours_mxfp4_w4a8_dequant_scaled_mm",
    }
    by_path = {}
    for r in rows:
        if r["path"] in scaled_mm and not has_cpu_scaled_mm():
            assert "_scaled_mm" in r.get("error", "_scaled_mm"), r
            continue
        assert "error" not in r, r
        by_path.setdefault(r["path"], []).append(r)
    for path in (
        "bf16",
        *(("comfy_fp8_unscaled", "ours_fp8_rowwise") if has_cpu_scaled_mm() else ()),
        "ours_fp8_fused",
        "ours_fp8_auto",
        "ours_mxfp4_w4a16",
        "ours_mxfp4_w4a16_dequant_cublas",
        "ours_mxfp4_w4a8",
    ):
        assert path in by_path, path
    for r in by_path.get("ours_fp8_rowwise", []) + by_path["ours_fp8_fused"]:
        assert 0.005 < r["rel_err_vs_bf16"] < 0.08  # FP8 W8A8 on N(0,1): ~3.7%
        assert r["weight_bytes"] < r["K"] * r["N"] * 2 * 0.52
    for r in by_path["ours_mxfp4_w4a16"]:
        assert 0.05 < r["rel_err_vs_bf16"] < 0.2  # MXFP4 W4A16: ~11%
        assert r["weight_bytes"] < r["K"] * r["N"] * 2 * 0.29
    md = (tmp_path / "results.md").read_text()
    assert "| model | layer | M×K×N" in md and "ours_fp8_rowwise" in md


def test_bench_gemm_runs_only_the_paths_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("ONLINEQUANT_DISABLE_TRITON", "1")
    argv = ["--quick", "--sections", "gemm", "--shapes", "8:64:32", "--out", str(tmp_path)]
    assert main([*argv, "--gemm-paths", "ours_fp8_w8a16,ours_fp8_auto"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["results"]["gemm"]
    assert sorted(r["path"] for r in rows) == ["bf16", "ours_fp8_auto", "ours_fp8_w8a16"]
    main([*argv, "--gemm-paths", "ours_fp9"])  # a section that fails is reported, not fatal
    skipped = json.loads((tmp_path / "results.json").read_text())["skipped"]
    assert "no path ['ours_fp9']" in skipped["gemm"]


@pytest.mark.slow
def test_bench_quick_models(tmp_path, comfyui_path, monkeypatch):
    monkeypatch.setenv("ONLINEQUANT_DISABLE_TRITON", "1")
    assert (
        main(
            [
                "--quick",
                "--sections",
                "models",
                "--models",
                "zimage",
                "--no-attention",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "results.json").read_text())["results"]["models"]
    got = {r["variant"]: r for r in rows}
    assert set(got) == {"bf16", "comfy_fp8_e4m3fn_fast", "ours_fp8", "ours_mxfp4"}, rows
    for r in got.values():
        assert "error" not in r and r["finite"]
    assert (
        got["ours_fp8"]["weight_vs_bf16"] < 0.9
        and got["ours_mxfp4"]["weight_vs_bf16"] < got["ours_fp8"]["weight_vs_bf16"]
    )
    assert 0 < got["ours_fp8"]["rel_err_vs_bf16"] < got["comfy_fp8_e4m3fn_fast"]["rel_err_vs_bf16"]
