"""Per-family data and detection (quant/families.py)."""

from __future__ import annotations

import pytest

from quant.errors import PatternError
from quant.models import (
    FAMILIES,
    default_ignore_text,
    describe_model,
    detect_family,
    get_family,
    reference_shapes,
)
from quant.selection.actions import parse_lines
from quant.selection.layers import reference_linears
from quant.selection.patterns import PatternSet, parse_patterns

PREFIXES = ["", "diffusion_model.", "model.diffusion_model."]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    "model,family",
    [
        ("zimage", "zimage"),
        ("wan21_t2v_14b", "wan21"),
        ("wan21_i2v_14b", "wan21"),
        ("wan21_t2v_1.3b", "wan21"),
        ("wan22_5b", "wan22_5b"),
    ],
)
def test_detect_full_size(model, family, prefix):
    shapes = {prefix + k: v for k, v in reference_shapes(model).items()}
    assert detect_family(shapes, shapes) == family
    # Names only: Wan 2.2 5B differs from Wan 2.1 only by head.head's shape.
    assert detect_family(list(shapes)) == ("wan21" if family == "wan22_5b" else family)


def test_detect_zimage_needs_dim_3840_when_shapes_known():
    shapes = {"cap_embedder.1.weight": (2304, 2304), "layers.0.attention.qkv.weight": (6912, 2304)}
    assert detect_family(shapes, shapes) == "generic"  # a Lumina2, not Z-Image
    shapes["cap_embedder.1.weight"] = (3840, 2560)
    assert detect_family(shapes, shapes) == "zimage"


def test_detect_wan_5b_by_head_out_192():
    shapes = {"head.modulation": (1, 2, 3072), "head.head.weight": (192, 3072)}
    assert detect_family(shapes, shapes) == "wan22_5b"
    shapes["head.head.weight"] = (64, 3072)
    assert detect_family(shapes, shapes) == "wan21"
    assert detect_family(["unet.down.0.weight"]) == "generic"


def test_describe_model():
    assert "I2V" in describe_model(reference_shapes("wan21_i2v_14b"), reference_shapes("wan21_i2v_14b"))
    assert "T2V" in describe_model(reference_shapes("wan21_t2v_14b"), reference_shapes("wan21_t2v_14b"))
    assert "40 blocks" in describe_model(reference_shapes("wan21_t2v_14b"), reference_shapes("wan21_t2v_14b"))
    assert "30 layers" in describe_model(reference_shapes("zimage"))


def test_aliases_and_unknown_family():
    assert get_family("wan22_14b") is get_family("wan21")
    with pytest.raises(PatternError, match="unknown model family 'sdxl'.*zimage"):
        get_family("sdxl")


@pytest.mark.parametrize("key", sorted(FAMILIES))
def test_default_text_parses_and_every_line_has_a_reason(key):
    parsed = parse_lines(default_ignore_text(key))
    assert len(parsed) == len(FAMILIES[key].ignore) > 0
    for p, _ in parsed:
        assert p.comment, f"{key}: pattern {p.text} has no reason"
    assert [(p.text, a) for p, a in parsed] == [(r.pattern, r.action) for r in FAMILIES[key].ignore]


@pytest.mark.parametrize(
    "key,model", [("zimage", "zimage"), ("wan21", "wan21_i2v_14b"), ("wan22_5b", "wan22_5b")]
)
def test_every_default_pattern_matches_the_real_model(key, model):
    names = [li.name for li in reference_linears(model)]
    ps = PatternSet([p for p, _ in parse_lines(default_ignore_text(key))])
    used = set()
    for n in names:
        used.update(ps.match(n))
    assert used == set(range(len(ps))), [ps.patterns[i].text for i in set(range(len(ps))) - used]


def test_default_text_drops_lines_the_model_lacks():
    full = default_ignore_text("wan21")
    t2v = default_ignore_text("wan21", [li.name for li in reference_linears("wan21_t2v_14b")])
    assert "img_emb" in full and "(I2V only)" in full
    assert "img_emb" not in t2v
    assert "self_attn" in t2v


def test_wan_defaults_quantize_attention_weights_only_and_leave_the_ffn_to_the_format():
    parsed = parse_lines(default_ignore_text("wan21"))
    ps = PatternSet([p for p, _ in parsed])
    assert {parsed[i][1] for i in ps.match("blocks.3.self_attn.q")} == {"weights-only"}
    assert {parsed[i][1] for i in ps.match("blocks.3.cross_attn.k_img")} == {"weights-only"}
    assert {parsed[i][1] for i in ps.match("text_embedding.0")} == {"keep"}
    assert not ps.match("blocks.3.ffn.0")
    assert not ps.match("blocks.3.ffn.2")


def test_zimage_defaults_cover_sensitive_layers_only():
    ps = PatternSet(parse_patterns(default_ignore_text("zimage")))
    for n in [
        "x_embedder",
        "cap_embedder.1",
        "t_embedder.mlp.0",
        "layers.4.adaLN_modulation.0",
        "final_layer.linear",
        "final_layer.adaLN_modulation.1",
    ]:
        assert ps.match(n), n
    for n in [
        "layers.4.attention.qkv",
        "layers.4.attention.out",
        "layers.4.feed_forward.w2",
        "noise_refiner.0.feed_forward.w1",
    ]:
        assert not ps.match(n), n
