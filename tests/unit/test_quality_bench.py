"""python -m quant.bench.quality --quick: runs, writes Markdown + JSON, and its numbers rank the
formats the way the format definitions say they must."""

from __future__ import annotations

import json
import math

import pytest

from quant.bench import ablation as ab
from quant.bench import quality as qb


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    d = tmp_path_factory.mktemp("qb")
    rc = qb.main(["--quick", "--models", "zimage", "--json", str(d / "q.json"), "--md", str(d / "q.md")])
    assert rc == 0
    return json.loads((d / "q.json").read_text()), (d / "q.md").read_text()


def test_quick_outputs_every_family_and_variant(quick):
    res, md = quick
    fams = {r["family"] for r in res["rows"]}
    assert fams == {"qkv", "attn_out", "ffn_up", "ffn_down", "modulation", "embedder", "time_embed", "head"}
    assert {r["weight_profile"] for r in res["rows"]} == {"normal", "structured"}
    for r in res["rows"]:
        assert set(r["results"]) == set(qb.FP8_VARIANTS + qb.MXFP4_VARIANTS)
        for v in r["results"].values():
            assert set(v["out"]) >= {"W8A16/normal", "W8A8/outliers"} or set(v["out"]) >= {"W4A16/normal"}
    assert "| zimage | layers.0.attention.qkv |" in md and "Chosen per family" in md
    assert set(res["defaults"]) == fams
    for d in res["defaults"].values():
        assert d["mxfp4_rounding"] in ("even", "floor", "ceil")
        assert d["fp8_granularity"] in ("channel", "tensor")


def test_quick_numbers_rank_formats(quick):
    res, _ = quick
    for r in res["rows"]:
        fp8 = r["results"]["fp8_channel"]
        mx = r["results"]["mxfp4_even"]
        # FP8 (3 mantissa bits) beats MXFP4 (1 mantissa bit) by far, on weights and outputs
        assert fp8["weight_sqnr_db"] > mx["weight_sqnr_db"] + 8
        assert fp8["out"]["W8A16/normal"] > mx["out"]["W4A16/normal"] + 8
        # quantizing activations too can only add error (on Gaussian inputs, with margin for noise)
        assert fp8["out"]["W8A8/normal"] < fp8["out"]["W8A16/normal"] + 0.5
        assert mx["out"]["W4A4/normal"] < mx["out"]["W4A16/normal"] + 0.5
        # a per-tensor scale cannot beat per-channel on the worst channel by more than noise
        assert fp8["min_channel_sqnr_db"] > r["results"]["fp8_tensor"]["min_channel_sqnr_db"] - 0.5
        assert all(math.isfinite(v["weight_sqnr_db"]) for v in r["results"].values())


def test_choose_defaults_rules():
    def row(fam, even, floor, ceil, ch, te, ch_min, te_min):
        mk = lambda x: {"weight_sqnr_db": x, "min_channel_sqnr_db": x, "out": {"W4A16/normal": x}}
        return {
            "family": fam,
            "results": {
                "mxfp4_even": mk(even), "mxfp4_floor": mk(floor), "mxfp4_ceil": mk(ceil),
                "fp8_channel": {"min_channel_sqnr_db": ch_min, "out": {"W8A8/normal": ch}},
                "fp8_tensor": {"min_channel_sqnr_db": te_min, "out": {"W8A8/normal": te}},
            },
        }

    d = qb.choose_defaults([row("a", 17.0, 17.5, 16.0, 30.0, 30.0, 29.0, 29.0),
                            row("b", 17.0, 17.02, 16.0, 30.0, 29.0, 29.0, 27.0)])
    assert d["a"]["mxfp4_rounding"] == "floor"  # clearly better than even
    assert d["a"]["fp8_granularity"] == "tensor"  # channel gains nothing
    assert d["b"]["mxfp4_rounding"] == "even"  # within the tie margin: keep AITER's
    assert d["b"]["fp8_granularity"] == "channel"


def test_unknown_model_is_an_error(capsys):
    assert qb.main(["--quick", "--models", "sdxl"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_ablation_quick_orders_groups():
    res = ab.ablation(quick=True)
    g = res["groups"]
    assert g["all"]["params_share"] == pytest.approx(1.0)
    for scheme in ab.ABLATION_SCHEMES:
        # quantizing more layers adds error: one family < all-but-defaults < all
        assert g["all"][scheme] < g["all but defaults"][scheme]
        for name in ab.ABLATION_GROUPS:
            assert g[name][scheme] > g["all"][scheme]
    for name, d in g.items():
        assert d["FP8 W8A8"] > d["MXFP4 W4A16"], name
    md = ab.ablation_markdown(res)
    assert "| all but defaults |" in md
