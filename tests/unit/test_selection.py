"""Layer selection (quant/selection.py): rules, fused layers, warnings, plans of the real models."""

from __future__ import annotations

import json

import pytest
import torch

from quant.errors import PatternError
from quant.models import reference_shapes
from quant.selection.layers import LinearInfo, linears_from_module, linears_from_shapes, reference_linears
from quant.selection.plan import build_plan, compact_names

Z = reference_linears("zimage")


def params(ds):
    return sum(d.out_features * d.in_features for d in ds)


# --- inputs -----------------------------------------------------------------------------------


def test_linears_from_module_skips_non_linear():
    m = torch.nn.Module()
    m.diffusion_model = torch.nn.Module()
    m.diffusion_model.proj = torch.nn.Linear(64, 512)
    m.diffusion_model.norm = torch.nn.LayerNorm(64)
    m.diffusion_model.emb = torch.nn.Embedding(100, 64)
    m.diffusion_model.conv = torch.nn.Conv2d(4, 8, 3)
    assert linears_from_module(m) == [LinearInfo("proj", 512, 64)]


def test_linears_from_shapes_rules():
    shapes = {
        "model.diffusion_model.a.weight": (512, 64),
        "model.diffusion_model.a.bias": (512,),
        "diffusion_model.norm.weight": (64,),
        "conv.weight": (8, 4, 3, 3),
        "x_pad_token": (1, 3840),
        "text.embed_tokens.weight": (32000, 4096),
        "b.weight_scale": (512, 1),
        "c.weight": (256, 32),
    }
    assert linears_from_shapes(shapes) == [LinearInfo("a", 512, 64), LinearInfo("c", 256, 32)]


# --- rules ------------------------------------------------------------------------------------

SMALL = [
    LinearInfo("layers.0.attention.qkv", 768, 256),
    LinearInfo("layers.0.attention.out", 256, 256),
    LinearInfo("layers.0.feed_forward.w1", 512, 256),
    LinearInfo("layers.0.feed_forward.w2", 256, 512),
    LinearInfo("layers.0.feed_forward.w3", 512, 256),
    LinearInfo("final_layer.linear", 64, 256),
    LinearInfo("odd", 256, 48),  # K not a multiple of 32: mxfp4 can't
]


def test_empty_text_quantizes_everything_eligible():
    plan = build_plan(SMALL, "mxfp4", "", family="zimage")
    src = {d.name: d.source for d in plan.decisions}
    assert src["final_layer.linear"] == "size"
    assert "64 < min_out_features 256" in plan.decision("final_layer.linear").reason
    assert src["odd"] == "format" and "48" in plan.decision("odd").reason
    assert [d.name for d in plan.quantized()] == [li.name for li in SMALL[:5]]
    assert all(d.source == "eligible" for d in plan.quantized())
    assert plan.warnings == []


def test_fp8_takes_any_k_and_min_out_is_a_parameter():
    plan = build_plan(SMALL, "fp8_e4m3fn", "", family="zimage", min_out_features=16)
    assert plan.decision("odd").quantize
    assert plan.decision("final_layer.linear").quantize


def test_none_uses_family_defaults_with_source_default():
    plan = build_plan(SMALL, "fp8_e4m3fn", None, family="zimage")
    d = plan.decision("final_layer.linear")
    assert (d.quantize, d.source, d.pattern) == (False, "default", "final_layer")
    assert "output projection" in d.reason  # the default line's reason comment
    assert plan.warnings == []  # defaults the model lacks are left out, not warned about


def test_pattern_decision_names_pattern_and_line():
    plan = build_plan(SMALL, "fp8_e4m3fn", "# keep\n\nw2  # down projection", family="zimage")
    d = plan.decision("diffusion_model.layers.0.feed_forward.w2")
    assert (d.quantize, d.source, d.pattern, d.line) == (False, "pattern", "w2", 3)
    assert "'w2' (line 3)" in d.reason and "down projection" in d.reason


def test_pattern_beats_size_rule():
    d = build_plan(SMALL, "mxfp4", "final_layer.linear", family="zimage").decision("final_layer.linear")
    assert d.source == "pattern" and d.pattern == "final_layer.linear"


def test_unmatched_patterns_warn():
    plan = build_plan(SMALL, "mxfp4", "w2\nnope, layers.1\nre:^zzz", family="zimage")
    assert plan.warnings == [
        "pattern 'nope' (line 2) matched no layer",
        "pattern 'layers.1' (line 2) matched no layer",
        "pattern 're:^zzz' (line 3) matched no layer",
    ]


def test_bad_regex_and_unknown_format():
    with pytest.raises(PatternError, match=r"'re:\(' \(line 2\)"):
        build_plan(SMALL, "mxfp4", "w2\nre:(", family="zimage")
    with pytest.raises(ValueError, match="int3"):
        build_plan(SMALL, "int3", "", family="zimage")
    with pytest.raises(ValueError, match="min_out_features must be >= 0"):
        build_plan(SMALL, "mxfp4", "", family="zimage", min_out_features=-1)


# --- fused layers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["attention.q", "to_q", "attention.to_k", "layers.0.attention.v", "to_q, to_k"]
)
def test_partial_fused_ignore_is_an_error(text):
    with pytest.raises(PatternError) as e:
        build_plan(SMALL, "mxfp4", text, family="zimage")
    msg = str(e.value)
    assert "fused" in msg and "layers.0.attention.qkv" in msg and "(line 1)" in msg
    assert "'attention.qkv'" in msg  # tells how to fix it


@pytest.mark.parametrize(
    "text", ["attention.q\nattention.k\nattention.v", "to_q, to_k, to_v", "attention.[qkv]"]
)
def test_all_fused_parts_ignore_the_fused_layer(text):
    plan = build_plan(SMALL, "mxfp4", text, family="zimage")
    d = plan.decision("layers.0.attention.qkv")
    assert not d.quantize and d.source == "pattern" and "all parts" in d.reason
    assert plan.decision("layers.0.attention.out").quantize
    assert plan.warnings == []


def test_fused_layer_ignored_whole_beats_partial_part():
    plan = build_plan(SMALL, "mxfp4", "attention.q\nattention", family="zimage")
    assert not plan.decision("layers.0.attention.qkv").quantize
    assert plan.warnings == []


def test_w13_maps_to_w1_and_w3():
    plan = build_plan(SMALL, "mxfp4", "w13", family="zimage")
    assert [d.name for d in plan.kept() if d.source == "pattern"] == [
        "layers.0.feed_forward.w1",
        "layers.0.feed_forward.w3",
    ]
    assert "as 'feed_forward.w13'" in plan.decision("layers.0.feed_forward.w1").reason
    assert plan.decision("layers.0.feed_forward.w2").quantize
    assert plan.warnings == []


def test_fusion_only_applies_to_its_family():
    # On a generic model 'attention.q' is just a name that matches nothing here.
    plan = build_plan(SMALL, "mxfp4", "attention.q", family="generic")
    assert plan.warnings == ["pattern 'attention.q' (line 1) matched no layer"]


def test_wan_diffusers_aliases():
    layers = reference_linears("wan22_5b")
    plan = build_plan(layers, "fp8_e4m3fn", "attn1.to_q\nffn.net.2", family="wan22_5b")
    assert not plan.decision("blocks.4.self_attn.q").quantize
    assert plan.decision("blocks.4.cross_attn.q").quantize
    assert not plan.decision("blocks.4.ffn.2").quantize
    assert plan.warnings == []


# --- full-size models -------------------------------------------------------------


def test_zimage_full_size_plan_counts_and_bytes():
    assert len(Z) == 208
    assert params(Z) == 6_153_863_168  # "Z-Image 6.15 B" Linear params
    plan = build_plan(Z, "mxfp4", None, family="auto")
    assert plan.family == "zimage"
    kept = plan.kept()
    # x_embedder, cap_embedder.1, t_embedder x2, 32 adaLN_modulation.0, final_layer x2
    assert len(kept) == 38 and len(plan.quantized()) == 170
    assert {d.source for d in kept} == {"default"}
    q = params(plan.quantized())
    assert q == sum(
        li.out_features * li.in_features
        for li in Z
        if li.name.split(".")[-2:-1] in (["attention"], ["feed_forward"])
    )
    assert plan.bytes_before() == 2 * params(Z)
    # MXFP4: 4 bits + one E8M0 byte per 32 weights = 4.25 bits.
    assert plan.bytes_after() == 2 * params(kept) + q * 17 // 32
    fp8 = build_plan(Z, "fp8_e4m3fn", None, family="zimage")
    fp8_q = fp8.quantized()
    assert fp8.bytes_after() == 2 * params(kept) + q + 4 * sum(d.out_features for d in fp8_q)


@pytest.mark.parametrize(
    "model,family,params_b,quantized,kept",
    [
        ("wan21_t2v_14b", "wan21", 14.28, 400, 6),
        ("wan21_i2v_14b", "wan21", None, 480, 8),
        ("wan22_5b", "wan22_5b", 5.00, 300, 6),
    ],
)
def test_wan_full_size_plans(model, family, params_b, quantized, kept):
    layers = reference_linears(model)
    if params_b is not None:
        assert round(params(layers) / 1e9, 2) == params_b
    plan = build_plan(layers, "mxfp4", None, family="auto")
    assert plan.family == family
    assert len(plan.quantized()) == quantized and len(plan.kept()) == kept
    # attention with bf16 activations (weights only), the FFN with quantized activations
    by_part = {(d.name.split(".")[2], d.precision) for d in plan.quantized()}
    assert by_part == {("self_attn", "weights-only"), ("cross_attn", "weights-only"), ("ffn", "")}
    assert plan.warnings == []
    none = build_plan(layers, "mxfp4", "", family=family)
    assert [d.name for d in none.kept()] == ["head.head"]  # only the out<256 rule


# --- output -----------------------------------------------------------------------------------


def test_summary_and_to_dict():
    plan = build_plan(Z, "fp8_e4m3fn", None, family="zimage")
    text = plan.summary()
    assert "quantize 170" in text and "keep 38" in text
    assert "layers.{0-29}.attention.qkv  (30 layers)" in text
    assert "11.46 GiB" in text
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["counts"]["quantized"] == 170 and d["counts"]["kept"] == 38
    assert d["bytes_before"] == plan.bytes_before() and d["bytes_after"] == plan.bytes_after()
    assert len(d["decisions"]) == 208
    first = d["decisions"][0]
    assert set(first) >= {
        "name",
        "out_features",
        "in_features",
        "quantize",
        "reason",
        "source",
        "pattern",
        "line",
    }


def test_compact_names():
    names = [f"blocks.{i}.ffn.{j}" for i in range(3) for j in (0, 2)] + ["head.head", "blocks.7.x"]
    assert compact_names(names) == ["blocks.{0-2}.ffn.{0,2}  (6 layers)", "head.head", "blocks.7.x"]
    assert compact_names(["a.1", "a.2", "a.5"]) == ["a.{1-2,5}  (3 layers)"]


def test_auto_family_from_reference_shapes():
    layers = linears_from_shapes(reference_shapes("wan22_5b"))
    assert build_plan(layers, "mxfp4", None, family="auto").family == "wan22_5b"


def test_default_lines_inside_user_text_keep_source_default():
    from quant.models import default_ignore_text

    text = default_ignore_text("zimage") + "w2  # mine\n"
    plan = build_plan(Z, "fp8_e4m3fn", text, family="zimage")
    assert plan.decision("x_embedder").source == "default"
    assert plan.decision("layers.3.feed_forward.w2").source == "pattern"
    assert plan.warnings == []


# --- the text users type: `# auto`, and line numbers of their own text --------------------------


def test_auto_text_is_the_defaults_plus_the_users_lines():
    from quant.selection.user_text import AUTO_IGNORE_TEXT, plan_from_text

    layers = reference_linears("wan22_5b")
    none_plan, d0 = plan_from_text(layers, "fp8_e4m3fn", None, "wan22_5b")
    auto_plan, d1 = plan_from_text(layers, "fp8_e4m3fn", AUTO_IGNORE_TEXT, "wan22_5b")
    assert d0 and d1 and none_plan.decisions == auto_plan.decisions
    everything, d2 = plan_from_text(layers, "fp8_e4m3fn", "", "wan22_5b")
    assert not d2 and len(everything.quantized()) > len(auto_plan.quantized())
    plus, _ = plan_from_text(layers, "fp8_e4m3fn", "# auto\nblocks.0.ffn.0\n", "wan22_5b")
    d = plus.decision("blocks.0.ffn.0")
    assert not d.quantize and d.source == "pattern" and d.line == 2
    assert [x.name for x in plus.kept() if x.source == "default"] == [
        x.name for x in auto_plan.kept() if x.source == "default"
    ]


@pytest.mark.parametrize(
    "text,family,where",
    [
        ("# auto\nre:((", "zimage", "line 2"),
        ("# auto: per-model defaults\n\nlayers.0, re:[", "zimage", "line 3"),
        ("# auto\nattention.q", "zimage", "line 2"),  # part of the fused qkv
    ],
)
def test_pattern_errors_name_the_users_line(text, family, where):
    from quant.selection.user_text import plan_from_text

    with pytest.raises(PatternError, match=where):
        plan_from_text(reference_linears(family), "fp8_e4m3fn", text, family)


def test_unmatched_warning_names_the_users_line():
    from quant.selection.user_text import plan_from_text

    plan, _ = plan_from_text(reference_linears("wan22_5b"), "mxfp4", "# auto\n\nno_such_layer\n", "wan22_5b")
    assert plan.warnings == ["pattern 'no_such_layer' (line 3) matched no layer"]


# --- per-layer precision: keep / weights-only / quantize lines ----------------------------------


def test_split_actions_keeps_line_numbers():
    from quant.selection.actions import split_actions

    parts = split_actions("x_embedder\nweights-only: self_attn  # why\nquantize: ffn\nkeep: head\nre:a:b")
    assert parts["keep"].splitlines() == ["x_embedder", "", "", " head", "re:a:b"]
    assert parts["weights-only"].splitlines()[1] == " self_attn  # why"
    assert parts["quantize"].splitlines()[2] == " ffn"


def test_wan_defaults_quantize_attention_weights_only():
    """New Wan defaults: attention weights in the format with bf16 activations, the FFN with
    quantized activations, conditioning/embedding/head layers kept (targets from the plan)."""
    for model, fp8_gib, mx_gib in (("wan21_t2v_14b", 13.6, 7.4), ("wan22_5b", 4.8, 2.6)):
        layers = reference_linears(model)
        fam = "wan22_5b" if model == "wan22_5b" else "wan21"
        for fmt, cap in (("fp8_e4m3fn", fp8_gib), ("mxfp4", mx_gib)):
            plan = build_plan(layers, fmt, None, fam)
            assert plan.bytes_after() / 2**30 <= cap, (model, fmt, plan.bytes_after() / 2**30)
        d = {x.name: x for x in plan.decisions}
        assert d["blocks.0.self_attn.q"].quantize and d["blocks.0.self_attn.q"].precision == "weights-only"
        assert d["blocks.0.cross_attn.o"].precision == "weights-only"
        assert d["blocks.0.ffn.0"].quantize and d["blocks.0.ffn.0"].precision == ""
        assert not d["head.head"].quantize and not d["text_embedding.0"].quantize


def test_the_ffn_only_setting_is_one_edit_away():
    from quant.selection.user_text import plan_from_text

    layers = reference_linears("wan22_5b")
    plan, _ = plan_from_text(layers, "fp8_e4m3fn", "# auto\nself_attn\ncross_attn\n", "wan22_5b")
    d = {x.name: x for x in plan.decisions}
    assert not d["blocks.3.self_attn.k"].quantize and d["blocks.3.self_attn.k"].line == 2
    assert not d["blocks.3.cross_attn.q"].quantize and d["blocks.3.ffn.2"].quantize


def test_last_matching_line_decides_and_size_rule_still_applies():
    layers = reference_linears("wan22_5b")
    text = "blocks\nweights-only: blocks.1\nquantize: blocks.1.ffn.0\nweights-only: head\n"
    plan = build_plan(layers, "mxfp4", text, "wan22_5b")
    d = {x.name: x for x in plan.decisions}
    assert not d["blocks.0.ffn.0"].quantize and d["blocks.0.ffn.0"].line == 1
    assert d["blocks.1.self_attn.q"].precision == "weights-only" and d["blocks.1.self_attn.q"].line == 2
    assert d["blocks.1.ffn.0"].precision == "quantize" and d["blocks.1.ffn.0"].line == 3
    assert not d["head.head"].quantize and d["head.head"].source == "size"  # out 192 < 256
    why = d["blocks.1.self_attn.q"].reason
    assert "weights only" in why and "(line 2)" in why
    assert plan.to_dict()["counts"]["weights_only"] == 9  # blocks.1: 8 attention + ffn.2


def test_fused_parts_cannot_get_different_precisions():
    text = "weights-only: attention.q\nweights-only: attention.k\nattention.v\n"
    with pytest.raises(PatternError, match="different precisions"):
        build_plan(Z, "fp8_e4m3fn", text, "zimage")
    plan = build_plan(
        Z, "fp8_e4m3fn", "weights-only: attention.to_q, attention.to_k, attention.to_v", "zimage"
    )
    assert plan.decision("layers.0.attention.qkv").precision == "weights-only"


def test_unknown_action_word_is_a_pattern_error_on_its_line():
    with pytest.raises(PatternError, match="line 2"):
        build_plan(Z, "fp8_e4m3fn", "x_embedder\nweight-only: attention.out\n", "zimage")
