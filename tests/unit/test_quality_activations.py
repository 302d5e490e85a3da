"""Activation statistics via forward hooks, fake quantization, and sensitivity applied to a plan."""

from __future__ import annotations

import math

import pytest
import torch

from quant import quality


def _toy(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 96))
    for lin in (m[0], m[2]):
        torch.nn.init.normal_(lin.weight, std=0.02)
    return m


def test_collector_records_first_call_only_and_removes_hooks():
    model = _toy()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 64, generator=g)
    x[..., 7] *= 50.0  # one outlier channel
    with quality.ActivationStatsCollector(model, schemes=("w8a8", "w4a4", "a8", "a4")) as col:
        model(x)
        first = col.stats["0"].amax
        model(x * 3.0)  # a second call must not overwrite the first
    assert set(col.stats) == {"0", "2"}
    assert col.stats["0"].amax == pytest.approx(first)
    s = col.stats["0"]
    assert s.tokens == 100 and s.in_features == 64 and s.out_features == 128
    assert torch.allclose(s.channel_amax, x.reshape(-1, 64).abs().amax(0))
    assert int(torch.argmax(s.channel_amax)) == 7
    assert s.outlier_ratio > 10
    assert s.kurtosis > 10  # Gaussian is 3; one channel x50 makes the tails heavy
    assert s.output_sqnr_db["a4"] < s.output_sqnr_db["a8"]  # MXFP4 blocks hold the outlier
    # hooks removed: another forward records nothing new
    col.stats.clear()
    model(x)
    assert col.stats == {}


def test_layer_stats_match_direct_computation():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=g)
    w = 0.02 * torch.randn(32, 64, generator=g)
    s = quality.layer_activation_stats("l", x, w, schemes=("w8a8", "w4a4"))
    ref = x @ w.t()
    y8 = quality.fake_quantize_activation(x, 8) @ quality.fake_quantize_weight(w, "fp8_channel").t()
    y4 = quality.fake_quantize_activation(x, 4) @ quality.fake_quantize_weight(w, "mxfp4_even").t()
    assert s.output_sqnr_db["w8a8"] == pytest.approx(quality.sqnr_db(ref, y8), abs=1e-6)
    assert s.output_sqnr_db["w4a4"] == pytest.approx(quality.sqnr_db(ref, y4), abs=1e-6)
    assert s.output_sqnr_db["w8a8"] > s.output_sqnr_db["w4a4"]
    mean, var = x.mean(), x.var(unbiased=False)
    assert s.kurtosis == pytest.approx(float(((x - mean) ** 4).mean() / var**2), rel=1e-5)


def test_subsampling_and_odd_k():
    x = torch.randn(1000, 40)  # K = 40: not a multiple of 32, MXFP4 schemes are skipped
    w = torch.randn(8, 40)
    s = quality.layer_activation_stats("odd", x, w, schemes=("w8a8", "w4a4"), max_tokens=100)
    assert s.tokens == 1000
    assert set(s.output_sqnr_db) == {"w8a8"}


def test_collector_table_worst_and_errors():
    model = _toy()
    with quality.ActivationStatsCollector(model, names=["2"]) as col:
        model(torch.randn(10, 64))
    assert set(col.stats) == {"2"}
    assert col.worst("w8a8", 5)[0].name == "2"
    assert "worst 1 layers for w8a8" in col.table()
    d = col.to_dict()
    assert d["layers"][0]["shape"] == [96, 128]
    with pytest.raises(ValueError, match="unknown schemes"):
        quality.ActivationStatsCollector(model, schemes=("w2a2",))


def test_fake_quantize_rejects_unknown():
    with pytest.raises(ValueError, match="unknown weight variant"):
        quality.fake_quantize_weight(torch.ones(4, 32), "int4")
    with pytest.raises(ValueError, match="8 or 4"):
        quality.fake_quantize_activation(torch.ones(4, 32), 2)


def test_fp8_tensor_vs_channel_on_uneven_rows():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 128, generator=g) * torch.logspace(-6, 0, 64).unsqueeze(1)  # rows span 1e6
    ch = quality.channel_sqnr_db(w, quality.fake_quantize_weight(w, "fp8_channel"))
    te = quality.channel_sqnr_db(w, quality.fake_quantize_weight(w, "fp8_tensor"))
    assert ch.shape == (64,)
    # a per-tensor scale flushes the smallest rows towards FP8's subnormals / zero
    assert float(ch.min()) > float(te.min()) + 10


def _plan(fmt: str = "fp8_e4m3fn"):
    from quant.selection.layers import LinearInfo
    from quant.selection.plan import build_plan

    layers = [LinearInfo(f"blocks.{i}.ffn.0", 512, 256) for i in range(4)]
    layers.append(LinearInfo("head.head", 64, 256))
    return build_plan(layers, fmt, "", family="generic")


def test_apply_sensitivity_worst_fraction_and_budget():
    plan = _plan()
    sq = {"blocks.0.ffn.0": 30.0, "blocks.1.ffn.0": 12.0, "blocks.2.ffn.0": 25.0, "blocks.3.ffn.0": 31.0}
    new, kept = quality.apply_sensitivity(plan, sq, "worst 25%")
    assert kept == ["blocks.1.ffn.0"]
    d = new.decision("blocks.1.ffn.0")
    assert not d.quantize and d.source == "sensitivity" and "12.0 dB" in d.reason
    assert plan.decision("blocks.1.ffn.0").quantize  # the input plan is unchanged
    assert len(new.quantized()) == len(plan.quantized()) - 1
    # budget: room for exactly one more bf16 layer over the quantized plan
    per_layer = 512 * 256 * 2 - plan.packed_nbytes(512, 256) if plan.packed_nbytes else None
    if per_layer is None:
        from quant.formats import get_format

        per_layer = 512 * 256 * 2 - get_format("fp8_e4m3fn").packed_nbytes(512, 256)
    budget = plan.bytes_after() + per_layer + 10
    new, kept = quality.apply_sensitivity(plan, sq, quality.SensitivityRule(byte_budget=budget))
    assert kept == ["blocks.1.ffn.0"]
    assert new.bytes_after() <= budget
    same, none = quality.apply_sensitivity(plan, sq, "none")
    assert same is plan and none == []


def test_measure_weight_sqnr_streams_only_quantized_layers():
    plan = _plan("mxfp4")
    g = torch.Generator().manual_seed(0)
    tensors = [(f"model.diffusion_model.blocks.{i}.ffn.0.weight", 0.02 * torch.randn(512, 256, generator=g))
               for i in range(4)]
    tensors += [("model.diffusion_model.head.head.weight", torch.randn(64, 256)), ("x.bias", torch.zeros(3))]
    got = quality.measure_weight_sqnr(iter(tensors), plan)
    assert sorted(got) == [f"blocks.{i}.ffn.0" for i in range(4)]
    assert all(10 < v < 30 and math.isfinite(v) for v in got.values())


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_e4m3fn_tensor", "mxfp4"])
def test_quantized_weight_sqnr_sampled_rows_are_exact_per_row(fmt):
    from quant.formats import get_format

    g = torch.Generator().manual_seed(11)
    w = (0.02 * torch.randn(300, 64, generator=g) * torch.linspace(0.1, 3, 300).unsqueeze(1)).bfloat16()
    qw = get_format(fmt).quantize(w)
    full = quality.quantized_weight_sqnr_db(w, qw, rows=None)
    assert full == pytest.approx(quality.sqnr_db(w, qw.dequantize(torch.float32)))
    idx = quality.sample_rows(300, 50)
    assert idx.numel() == 50 and idx[0] == 0 and idx[-1] == 299
    expect = quality.sqnr_db(w[idx], qw.dequantize(torch.float32)[idx])
    assert quality.quantized_weight_sqnr_db(w, qw, rows=50) == pytest.approx(expect, abs=1e-6)
    assert quality.quantized_weight_sqnr_db(w, qw, rows=1000) == pytest.approx(full)


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_e4m3fn_tensor", "mxfp4"])
def test_estimate_weight_sqnr_matches_full_quantization_rows(fmt):
    from quant.formats import get_format

    g = torch.Generator().manual_seed(12)
    w = 0.02 * torch.randn(400, 96, generator=g) * torch.linspace(0.05, 2, 400).unsqueeze(1)
    w[123, 7] = 1.5  # the tensor amax sits in a row the sample does not contain
    full = get_format(fmt).quantize(w).dequantize(torch.float32)
    idx = quality.sample_rows(400, 64)
    assert 123 not in idx.tolist()
    expect = quality.sqnr_db(w[idx], full[idx])
    assert quality.estimate_weight_sqnr_db(w, fmt, rows=64) == pytest.approx(expect, abs=1e-6)
    assert quality.estimate_weight_sqnr_db(w, fmt, rows=None) == pytest.approx(quality.sqnr_db(w, full))


def test_plan_with_sensitivity_text_and_noop():
    plan = _plan("mxfp4")
    g = torch.Generator().manual_seed(0)
    tensors = {f"blocks.{i}.ffn.0.weight": 0.02 * torch.randn(512, 256, generator=g) for i in range(4)}
    # heavy tails (cube of a Gaussian): each MX block's max is far above its typical value
    tensors["blocks.2.ffn.0.weight"] = tensors["blocks.2.ffn.0.weight"] ** 3 * 100
    new, kept, text = quality.plan_with_sensitivity(plan, tensors.items(), "worst 25%")
    assert kept == ["blocks.2.ffn.0"]
    assert not new.decision("blocks.2.ffn.0").quantize
    assert "1 layer(s) kept" in text and "blocks.2.ffn.0  #" in text
    same, none, t2 = quality.plan_with_sensitivity(plan, tensors.items(), "none")
    assert same is plan and none == [] and t2 == ""


def test_plan_with_sensitivity_budget_counts_other_params():
    plan = _plan("fp8_e4m3fn")
    g = torch.Generator().manual_seed(0)
    sd = {f"blocks.{i}.ffn.0.weight": 0.02 * torch.randn(512, 256, generator=g) for i in range(4)}
    sd["head.head.weight"] = torch.randn(64, 256, generator=g)
    sd["norm.weight"] = torch.ones(1000)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert quality.other_param_bytes(shapes, plan) == 2000  # head.head is in the plan (kept by size)
    from quant.formats import get_format

    extra = 512 * 256 * 2 - get_format("fp8_e4m3fn").packed_nbytes(512, 256)
    budget = plan.bytes_after() + 2000 + 2 * extra  # room for two layers in bf16
    rule = f"max {budget / 1e6} MB"
    new, kept, text = quality.plan_with_sensitivity(plan, sd, rule, shapes=shapes)
    assert len(kept) == 2 and new.bytes_after() + 2000 <= budget
    new, kept, _ = quality.plan_with_sensitivity(plan, sd, rule)  # without shapes: 2000 bytes unseen
    assert len(kept) == 2
    new, kept, _ = quality.plan_with_sensitivity(plan, sd, rule, shapes={**shapes, "big": (10**6,)})
    assert kept == [] and "no layer selected" in _
