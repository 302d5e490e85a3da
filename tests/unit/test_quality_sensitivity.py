"""choose_sensitive_layers rules, the keep_sensitive parser and the ignore-lines text."""

from __future__ import annotations

import math

import pytest

from quant import quality

ERRORS = {"a": 30.0, "b": 12.0, "c": 25.0, "d": 18.0, "e": math.nan, "f": 40.0}
# bytes added by keeping each layer in bf16
SIZES = {"a": 100, "b": 400, "c": 100, "d": 50, "e": 10, "f": 1000}


def test_threshold_keeps_layers_below_it_worst_first():
    assert quality.choose_sensitive_layers(ERRORS, threshold_db=20.0) == ["e", "b", "d"]
    assert quality.choose_sensitive_layers(ERRORS, threshold_db=-5.0) == ["e"]  # NaN is always worst


def test_fraction_rounds_up_and_is_deterministic():
    assert quality.choose_sensitive_layers(ERRORS, keep_worst_fraction=0.05) == ["e"]  # ceil(0.3) = 1
    assert quality.choose_sensitive_layers(ERRORS, keep_worst_fraction=0.5) == ["e", "b", "d"]
    assert quality.choose_sensitive_layers(ERRORS, keep_worst_fraction=0.0) == []
    ties = {"x": 10.0, "w": 10.0, "z": 11.0}
    assert quality.choose_sensitive_layers(ties, keep_worst_fraction=0.34) == ["w", "x"]  # ceil(1.02) = 2
    with pytest.raises(ValueError, match="keep_worst_fraction"):
        quality.choose_sensitive_layers(ERRORS, keep_worst_fraction=1.5)


def test_budget_alone_fills_worst_first_and_skips_what_does_not_fit():
    # base 1000, budget 1460: e(10) -> 1010, b(400) -> 1410, d(50) -> 1460, c(100) no, a(100) no, f no
    got = quality.choose_sensitive_layers(ERRORS, SIZES, byte_budget=1460, base_bytes=1000)
    assert got == ["e", "b", "d"]
    # budget 1100: e fits, b does not (skipped), d fits, c does not, a does not
    got = quality.choose_sensitive_layers(ERRORS, SIZES, byte_budget=1100, base_bytes=1000)
    assert got == ["e", "d"]
    assert quality.choose_sensitive_layers(ERRORS, SIZES, byte_budget=900, base_bytes=1000) == []


def test_budget_caps_threshold_choice():
    got = quality.choose_sensitive_layers(ERRORS, SIZES, threshold_db=26.0, byte_budget=70, base_bytes=0)
    assert got == ["e", "d"]  # b (400) and c (100) do not fit after e+d
    with pytest.raises(ValueError, match="sizes"):
        quality.choose_sensitive_layers(ERRORS, byte_budget=10)


def test_union_of_threshold_and_fraction():
    got = quality.choose_sensitive_layers(ERRORS, threshold_db=13.0, keep_worst_fraction=0.5)
    assert got == ["e", "b", "d"]
    got = quality.choose_sensitive_layers(ERRORS, threshold_db=26.0, keep_worst_fraction=0.2)
    assert got == ["e", "b", "d", "c"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", quality.SensitivityRule()),
        ("none", quality.SensitivityRule()),
        ("worst 5%", quality.SensitivityRule(keep_worst_fraction=0.05)),
        ("Below 20 dB", quality.SensitivityRule(threshold_db=20.0)),
        ("< 17.5dB", quality.SensitivityRule(threshold_db=17.5)),
        ("max 12 GB", quality.SensitivityRule(byte_budget=12 * 10**9)),
        ("<= 1 GiB", quality.SensitivityRule(byte_budget=2**30)),
        ("worst 10%, max 500 MB", quality.SensitivityRule(keep_worst_fraction=0.1, byte_budget=500 * 10**6)),
    ],
)
def test_parse_rule(text, expected):
    assert quality.parse_sensitivity_rule(text) == expected


@pytest.mark.parametrize("text", ["worst five", "12 GB", "worst 150%", "below x dB"])
def test_parse_rule_errors_quote_the_text(text):
    from quant.errors import OnlineQuantError, SensitivityRuleError

    with pytest.raises(SensitivityRuleError, match="keep_sensitive") as ei:
        quality.parse_sensitivity_rule(text)
    assert isinstance(ei.value, OnlineQuantError) and isinstance(ei.value, ValueError)


def test_rule_locality_and_keeps():
    thr = quality.parse_sensitivity_rule("below 20 dB")
    assert thr.is_local and thr.active
    assert thr.keeps(19.9) and not thr.keeps(20.0) and thr.keeps(math.nan)
    assert not quality.parse_sensitivity_rule("worst 5%").is_local
    assert not quality.SensitivityRule().active
    assert quality.parse_sensitivity_rule("worst 5%, max 2 GB").describe() == "worst 5%, max 2 GB"


def test_ignore_lines_text():
    text = quality.ignore_lines(["blocks.3.ffn.2", "head.head"], {"blocks.3.ffn.2": 12.345}, header="kept")
    assert text.splitlines() == ["# kept", "blocks.3.ffn.2  # 12.3 dB", "head.head"]


@pytest.mark.parametrize("model", ["zimage", "wan21_i2v_14b", "wan22_5b"])
def test_ignore_lines_match_exactly_the_chosen_layers(model):
    """The pasted text, read by the pattern language of quant/patterns.py, selects exactly the
    chosen layers of the real model's Linear layers and nothing else."""
    from quant.selection.layers import reference_linears
    from quant.selection.patterns import PatternSet, parse_patterns

    names = [li.name for li in reference_linears(model)]
    chosen = names[::17] + [names[-1]]
    ps = PatternSet(parse_patterns(quality.ignore_lines(chosen, {n: 12.5 for n in chosen}, header="worst")))
    assert [n for n in names if ps.match(n)] == [n for n in names if n in set(chosen)]
