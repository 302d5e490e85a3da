"""The loader's quality hooks in a real ComfyUI: per-layer weight SQNR in the load report (on by
default, row-sampled) and `keep_sensitive` keeping the worst layers in bf16."""

from __future__ import annotations

import math

import helpers_models as hm
import pytest

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def loader(pack):
    hm.import_submodules(pack, "nodes.loader", "nodes.layouts", "nodes.ops", "quant.quality")
    return pack.nodes.loader


@pytest.fixture(scope="module")
def wan_file(comfyui_path, tmp_path_factory):
    return hm.save_model(hm.wan_model(seed=0), tmp_path_factory.mktemp("ql") / "wan_tiny.safetensors")


@pytest.mark.parametrize(("fmt", "lo", "hi"), [("fp8_e4m3fn", 28.0, 35.0), ("mxfp4", 15.0, 21.0)])
def test_report_has_per_layer_sqnr_by_default(loader, wan_file, fmt, lo, hi):
    _, rep = loader.load_quantized(str(wan_file), fmt, "")
    q = rep.quantized()
    assert q and all(r.sqnr_db is not None and lo < r.sqnr_db < hi for r in q)
    assert all(r.sqnr_db is None for r in rep.kept())
    d = rep.to_dict()
    assert d["sqnr"]["layers"] == len(q) and lo < d["sqnr"]["min_db"] <= d["sqnr"]["mean_db"] < hi
    worst = min(q, key=lambda r: r.sqnr_db)
    assert f"  {worst.name}  # {worst.sqnr_db:.1f} dB" in rep.to_text()  # pasteable worst-layer line


def test_keep_sensitive_worst_fraction(pack, loader, wan_file):
    _, base = loader.load_quantized(str(wan_file), "mxfp4", "")
    _, rep = loader.load_quantized(str(wan_file), "mxfp4", "", keep_sensitive="worst 10%")
    n = len(base.quantized())
    kept = [r for r in rep.kept() if r.source == "sensitivity"]
    assert len(kept) == math.ceil(0.1 * n)
    assert len(rep.quantized()) == n - len(kept)
    assert all("sensitive: weight SQNR" in r.reason for r in kept)
    note = next(x for x in rep.notes if x.startswith("keep_sensitive"))
    for r in kept:
        assert f"\n{r.name}  # " in note  # pasteable line with its SQNR
    # the kept layers are the worst of the plain load's report (same weights, same 256 sampled rows)
    worst = sorted(base.quantized(), key=lambda r: r.sqnr_db)[: len(kept)]
    assert {r.name for r in worst} == {r.name for r in kept}


def test_keep_sensitive_bad_text_names_the_option(loader, wan_file):
    from comfyui_online_quant.quant.errors import SensitivityRuleError

    with pytest.raises(SensitivityRuleError, match="keep_sensitive"):
        loader.load_quantized(str(wan_file), "fp8_e4m3fn", "", keep_sensitive="the worst ones")
