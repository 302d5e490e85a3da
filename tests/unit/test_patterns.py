"""The ignore-pattern language (quant/patterns.py): parsing, dot-boundary matching, globs,
regexes, errors naming the pattern and line, and scale."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.errors import PatternError
from quant.selection.patterns import PatternSet, parse_patterns


def texts(text):
    return [p.text for p in parse_patterns(text)]


def matches(pattern: str, name: str) -> bool:
    (p,) = parse_patterns(pattern)
    ps = PatternSet([p])
    direct = p.matches(name)
    assert bool(ps.match(name)) == direct  # the index agrees with the pattern itself
    return direct


def test_lines_commas_comments_blanks():
    text = "# whole-line comment\n\nattention  # trailing\nw1, w3 ,\n   \n  final_layer\n"
    ps = parse_patterns(text)
    assert [p.text for p in ps] == ["attention", "w1", "w3", "final_layer"]
    assert [p.line for p in ps] == [3, 4, 4, 6]
    assert ps[0].comment == "trailing"


def test_empty_and_none():
    assert parse_patterns("") == []
    assert parse_patterns(None) == []
    assert parse_patterns("# only a comment\n\n") == []


def test_regex_runs_to_end_of_line_commas_included():
    ps = parse_patterns(r"w2, re:^layers\.[0-9]{1,2}\.ffn  # comment")
    assert [p.kind for p in ps] == ["plain", "regex"]
    assert ps[1].text == r"re:^layers\.[0-9]{1,2}\.ffn"
    assert ps[1].matches("layers.12.ffn.w1")
    assert not ps[1].matches("layers.123.ffn.w1")


@pytest.mark.parametrize(
    "pattern,name,expected",
    [
        ("attention", "layers.3.attention.qkv", True),
        ("attention", "layers.3.attention_norm1", False),
        ("layers.3", "layers.3.attention.qkv", True),
        ("layers.3", "layers.30.attention.qkv", False),
        ("layers.3", "xlayers.3.attention", False),
        ("attention.q", "layers.3.attention.qkv", False),
        ("attention.q", "layers.3.attention.q", True),
        ("qkv", "layers.3.attention.qkv", True),
        ("layers.3.attention.qkv", "layers.3.attention.qkv", True),
        ("x_embedder", "x_embedder", True),
        ("Attention", "layers.3.attention.qkv", False),  # case-sensitive
    ],
)
def test_dot_boundary(pattern, name, expected):
    assert matches(pattern, name) is expected


@pytest.mark.parametrize(
    "pattern,name,expected",
    [
        ("layers.*.feed_forward", "layers.7.feed_forward.w1", True),
        ("layers.*.feed_forward", "layers.7.x.feed_forward.w1", False),  # '*' never crosses a dot
        ("layers.*.*.w1", "layers.7.feed_forward.w1", True),
        ("*", "anything.at.all", True),
        ("layers.1?", "layers.12.ffn", True),
        ("layers.1?", "layers.1.ffn", False),
        ("layers.1?", "layers.123.ffn", False),
        ("layers.1*", "layers.1.ffn", True),
        ("layers.1*", "layers.19.ffn", True),
        ("layers.1*", "layers.2.ffn", False),
        ("w[13]", "ff.w1", True),
        ("w[13]", "ff.w2", False),
        ("w[!13]", "ff.w2", True),
        ("layers.[0-4].out", "layers.3.out", True),
        ("layers.[0-4].out", "layers.5.out", False),
        ("a[.]b", "a.b", False),  # a class never matches a dot
        ("*_embedder", "t_embedder.mlp.0", True),
        ("*_embedder", "t_embedder_x.mlp.0", False),
    ],
)
def test_globs(pattern, name, expected):
    assert matches(pattern, name) is expected


def test_regex_is_search_on_full_name():
    assert matches("re:ttention\\.qk", "layers.3.attention.qkv")  # no dot rule for regexes
    assert matches("re:^layers\\.3\\.", "layers.3.attention.qkv")
    assert not matches("re:^layers\\.3\\.", "layers.30.attention.qkv")


def test_prefix_in_pattern_is_dropped():
    assert matches("diffusion_model.layers.3", "layers.3.attention.qkv")
    assert matches("model.diffusion_model.final_layer", "final_layer.linear")


@pytest.mark.parametrize(
    "text,line,fragment",
    [
        ("ok\nre:a(b", 2, "not a valid regular expression"),
        ("re:[", 1, "not a valid regular expression"),
        ("a\nb\nre:", 3, "empty regular expression"),
        ("layers..3", 1, "empty segment"),
        (".attention", 1, "empty segment"),
        ("attention.", 1, "empty segment"),
        ("layers 3", 1, "whitespace"),
        ("w[13", 1, "without a closing"),
        ("w[3-1]", 1, "not a valid glob"),
        ("RE:^layers", 1, "the only prefix is 're:'"),
    ],
)
def test_errors_name_pattern_and_line(text, line, fragment):
    with pytest.raises(PatternError) as e:
        parse_patterns(text)
    msg = str(e.value)
    assert fragment in msg
    assert f"(line {line})" in msg
    bad = text.splitlines()[line - 1].strip()
    assert repr(bad) in msg


def test_match_returns_all_in_order():
    ps = PatternSet(parse_patterns("ffn\nlayers.*\nre:w1$\nnothing\nlayers.3.ffn.w1"))
    assert ps.match("layers.3.ffn.w1") == [0, 1, 2, 4]
    assert ps.first("layers.3.ffn.w1").text == "ffn"
    assert ps.match("other") == []
    assert ps.first("other") is None


def test_ten_thousand_patterns_of_every_kind():
    names = [f"layers.{b}.{x}" for b in range(40) for x in ("attention.qkv", "ffn.w1", "ffn.w2")]
    plain = [f"layers.{i}.ffn" for i in range(3400)]
    globs = [f"layers.{i}.*.w2" for i in range(3300)]
    globs += [f"blocks.{i}.*.w2" for i in range(2300)]
    regexes = [f"re:^layers\\.{i}\\.attention" for i in range(1000)]  # MAX_REGEX_PATTERNS
    text = "\n".join(plain + globs + regexes)
    ps = PatternSet(parse_patterns(text))
    assert len(ps) == 10000
    hits = {n: ps.match(n) for n in names}
    # layers.5.ffn.w2 matches plain 'layers.5.ffn' (index 5) and glob 'layers.5.*.w2'.
    assert hits["layers.5.ffn.w2"] == [5, 3400 + 5]
    assert hits["layers.7.attention.qkv"] == [9000 + 7]
    assert hits["layers.39.ffn.w1"] == [39]
    used = set().union(*hits.values())
    assert len(used) == 3 * 40


def test_combined_prefilter_with_groups_and_flags_is_exact():
    # More than 8 scanned regexes switches on the combined prefilter; groups/flags disable it.
    text = "\n".join([f"re:^nomatch{i}" for i in range(9)] + ["re:(a)\\1", "re:(?i)^LAYERS"])
    ps = PatternSet(parse_patterns(text))
    assert ps.match("x.aa.y") == [9]
    assert ps.match("layers.1") == [10]


_SEG = st.sampled_from(["layers", "3", "30", "attention", "qkv", "q", "ffn", "w1", "w13", "x_embedder"])
_PSEG = st.one_of(_SEG, st.sampled_from(["*", "?", "w?", "*_embedder", "layers*", "[13]", "3?"]))


@settings(max_examples=200, deadline=None)
@given(
    names=st.lists(st.lists(_SEG, min_size=1, max_size=5).map(".".join), min_size=1, max_size=20),
    pats=st.lists(
        st.one_of(
            st.lists(_PSEG, min_size=1, max_size=3).map(".".join),
            st.sampled_from(["re:^layers", "re:q$", "re:\\.3", "re:ffn|attention"]),
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_index_agrees_with_brute_force(names, pats):
    patterns = parse_patterns("\n".join(pats))
    ps = PatternSet(patterns)
    for n in names:
        assert ps.match(n) == [i for i, p in enumerate(patterns) if p.matches(n)]
        # and with the documented rule for plain patterns: a run of whole segments
        segs = n.split(".")
        for i, p in enumerate(patterns):
            if p.kind == "plain":
                k = p.text.split(".")
                whole = any(segs[j : j + len(k)] == k for j in range(len(segs)))
                assert (i in ps.match(n)) == whole


# ---- bounded cost: a pattern cannot freeze the process ----------------------------------------


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("ok\nre:x{4294967296}", "not a valid regular expression"),  # was a bare OverflowError
        ("ok\nre:(((a{1000}){1000}){1000}){1000}", "too large"),  # the compiler would exhaust memory
        ("ok\nre:" + "a" * 1001, "characters long"),
        ("ok\n" + "a" * 1001, "characters long"),
    ],
    ids=["overflow", "expansion", "long-regex", "long-plain"],
)
def test_oversized_patterns_are_pattern_errors_naming_the_line(text, fragment):
    with pytest.raises(PatternError, match=r"\(line 2\)") as e:
        parse_patterns(text)
    assert fragment in str(e.value)


def test_too_many_regexes_is_a_pattern_error():
    from quant.selection.regex_engine import MAX_REGEX_PATTERNS

    text = "\n".join(f"re:^x{i}$" for i in range(MAX_REGEX_PATTERNS + 1))
    with pytest.raises(PatternError, match=rf"\(line {MAX_REGEX_PATTERNS + 1}\).*more than"):
        parse_patterns(text)


@pytest.mark.parametrize("hostile", [r"re:^(a|aa)+$", r"re:^(?:a|aa)+x, with a comma"])
def test_backtracking_pattern_stops_at_the_budget_naming_the_line(monkeypatch, hostile):
    """Exponential backtracking (seconds per name here, hours on longer ones) ends as a
    PatternError naming the pattern once the set's budget is spent; the process never hangs."""
    import threading

    from quant.selection import regex_engine as P

    monkeypatch.setattr(P, "MATCH_BUDGET_S", 0.5)
    names = ["a" * 60 + f".x{i}" for i in range(50)] + ["a" * 60 + ".x"]
    ps = PatternSet(parse_patterns("attention\n" + hostile))
    out: list = []

    def run():
        try:
            out.append([ps.match(n) for n in names])
        except PatternError as e:
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)  # a hang guard, not a timing assertion
    assert not t.is_alive(), "matching did not stop"
    (err,) = out
    assert isinstance(err, PatternError), err
    assert f"{hostile!r} (line 2)" in str(err) and "took more than" in str(err)
