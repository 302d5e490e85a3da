"""Ignored-layers patterns: the ONE definition of what a pattern in the ignore text means.

sglang changed its rule three times (exact, substring, dot-boundary) and its own docs' example
stopped matching; this module defines the rule once and every caller (loader node, web preview,
CLI) goes through it.

Text format
-----------
- One pattern per line, or several on a line separated by commas.
- ``#`` starts a comment, on its own line or after a pattern. Blank lines are ignored.
- Surrounding whitespace is stripped. A leading ``diffusion_model.`` or
  ``model.diffusion_model.`` is dropped from a pattern, because layer names are matched
  without that prefix.
- ``re:`` starts a regular expression that runs to the end of the line (commas inside it are
  part of the regex, ``#`` still starts a comment: layer names never contain ``#``).

Matching (names are dot-separated, e.g. ``layers.3.attention.qkv``)
------------------------------------------------------------------
=========================  ==============================================================
pattern                    matches
=========================  ==============================================================
``attention``              any name with a whole segment ``attention``:
                           ``layers.3.attention.qkv`` yes, ``attention_norm1`` no
``layers.3``               the run of whole segments ``layers.3``:
                           ``layers.3.attention.qkv`` yes, ``layers.30.ffn`` no
``attention.q``            ``x.attention.q`` yes, ``x.attention.qkv`` no
``layers.*.feed_forward``  ``*`` = any characters *within one segment* (never a dot)
``layers.1?.attention``    ``?`` = exactly one character, not a dot (``layers.10`` .. ``19``)
``layers.[0-4].out``       ``[...]``/``[!...]`` = one character from/not from the set
``re:^layers\\.(1|2)\\.``   Python regex, ``re.search`` on the whole name (no dot rule)
=========================  ==============================================================

A plain or glob pattern P matches a name N when P matches a contiguous run of N's whole
segments: the compiled form is ``(?:^|\\.)P(?:\\.|$)``. To span several segments with a glob,
write one ``*`` per segment (``layers.*.*.qkv``) or use ``re:``. Matching is case-sensitive.

Speed: plain patterns (no glob characters) are looked up in a dict keyed by every run of a
name's segments, so 10,000 exact layer names cost O(layers); a glob is only tried on names
that contain one of its literal segments; regexes are tried on every name.

Bounded cost: the text comes from users and the names from untrusted files, and a backtracking
regex such as ``^(.*?)*(.*?)*!`` can take hours on one name while Python's ``re`` holds the GIL
(a worker thread does not keep the server answering). So globs and regexes run on the ``regex``
package (the syntax of Python's ``re``) behind `_search`: a search holds the GIL for at most
`HOLD_GIL_S`, then continues with the GIL released, and all the searches of one pattern set share
a budget of `MATCH_BUDGET_S` seconds; over it, the pattern at fault is a PatternError naming its
line. Compiling is bounded too: at most `MAX_PATTERN_CHARS` characters a pattern, at most
`MAX_REGEX_PATTERNS` regexes, and counted repeats whose expansion (``(a{1000}){1000}``) would
exhaust memory in the compiler are refused (quant/selection/regex_engine.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import PatternError
from . import regex_engine as _rx
from .regex_engine import MAX_PATTERN_CHARS, MAX_REGEX_PATTERNS, MAX_REGEX_SIZE, MAX_REGEX_TOTAL_SIZE

__all__ = ["Pattern", "PatternSet", "parse_patterns", "strip_prefix", "KNOWN_PREFIXES"]

# Prefixes a checkpoint or ComfyUI's model adds in front of the transformer's own names.
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

_GLOB_CHARS = re.compile(r"[*?\[]")



def strip_prefix(name: str) -> str:
    """Drop a leading ``model.diffusion_model.`` / ``diffusion_model.`` from a layer name."""
    for p in KNOWN_PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


@dataclass(frozen=True)
class Pattern:
    """One pattern of the ignore text."""

    text: str  # as written, stripped (``re:`` included)
    line: int  # 1-based line of the ignore text
    kind: str  # "plain", "glob" or "regex"
    regex: Any = field(compare=False, repr=False)  # a compiled pattern of the `regex` package
    comment: str = field(default="", compare=False)  # the line's trailing '# ...' text, if any
    size: int = field(default=1, compare=False)  # expanded size (regexes), see MAX_REGEX_SIZE

    def matches(self, name: str) -> bool:
        return _rx.search(self.where(), self.regex, name, _rx.Budget())

    def where(self) -> str:
        """``'attention.q' (line 3)`` — how messages name this pattern."""
        return f"{self.text!r} (line {self.line})"


def _glob_to_regex(glob: str, text: str, line: int) -> str:
    """Translate one glob to a regex body whose wildcards never cross a dot."""
    out = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            j = glob.find("]", i + 2 if glob[i + 1 : i + 2] in ("!", "]") else i + 1)
            if j < 0:
                raise PatternError(f"pattern {text!r} (line {line}): '[' without a closing ']'")
            body = glob[i + 1 : j]
            neg = body.startswith("!")
            if neg:
                body = body[1:]
            # Everything but '-' (ranges) is literal inside a glob class.
            body = "".join(ch if ch == "-" else re.escape(ch) for ch in body)
            # A class never matches a dot, so the dot-boundary rule holds for classes too.
            out.append(f"[^.{body}]" if neg else f"(?![.])[{body}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _make_pattern(token: str, line: int, comment: str = "") -> Pattern:
    if token.startswith("re:"):
        body = token[3:].strip()
        if not body:
            raise PatternError(f"pattern {token!r} (line {line}): empty regular expression after 're:'")
        rx, size = _rx.compile_regex(body, token, line)
        return Pattern(token, line, "regex", rx, comment, size)
    body = strip_prefix(token)
    if len(body) > MAX_PATTERN_CHARS:
        raise PatternError(
            f"pattern {token[:60]!r}... (line {line}) is {len(body)} characters long; at most "
            f"{MAX_PATTERN_CHARS} (layer names are far shorter)"
        )
    if ":" in body:
        raise PatternError(
            f"pattern {token!r} (line {line}): layer names have no ':'; the only prefix is 're:' "
            "(lower case) for a regular expression"
        )
    if body.startswith(".") or body.endswith(".") or ".." in body:
        raise PatternError(
            f"pattern {token!r} (line {line}): empty segment (a leading, trailing or doubled '.'); "
            "patterns match whole dot-separated segments, e.g. 'attention' or 'layers.3'"
        )
    if any(ch.isspace() for ch in body):
        raise PatternError(
            f"pattern {token!r} (line {line}) contains whitespace; put one pattern per line "
            "or separate patterns with commas"
        )
    kind = "glob" if _GLOB_CHARS.search(body) else "plain"
    rx_body = _glob_to_regex(body, token, line) if kind == "glob" else re.escape(body)
    try:
        rx = _rx.engine.compile(r"(?:^|\.)" + rx_body + r"(?:\.|$)")
    except (re.error, _rx.engine.error) as e:  # e.g. a bad range inside [...]
        raise PatternError(f"pattern {token!r} (line {line}) is not a valid glob: {e}") from None
    return Pattern(token, line, kind, rx, comment)


def parse_patterns(text: str | None) -> list[Pattern]:
    """Parse the ignore text into patterns, in order. Duplicates are kept (each has its line).

    Raises PatternError naming the pattern and its line for an invalid regex or glob, and for
    regexes over the limits (MAX_PATTERN_CHARS, MAX_REGEX_PATTERNS, MAX_REGEX_TOTAL_SIZE).
    """
    patterns: list[Pattern] = []
    if not text:
        return patterns
    n_regex = total_size = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line, _, comment = raw.partition("#")
        line, comment = line.strip(), comment.strip()
        if not line:
            continue
        # Everything after the first 're:' token is one regex (commas are legal in regexes).
        head, sep, rest = line.partition("re:")
        if sep and (not head.strip() or head.rstrip().endswith(",")):
            tokens = [t.strip() for t in head.split(",")] + ["re:" + rest]
        else:
            tokens = [t.strip() for t in line.split(",")]
        for tok in tokens:
            if not tok:
                continue
            if tok.startswith("re:"):
                n_regex += 1
                if n_regex > MAX_REGEX_PATTERNS:
                    raise PatternError(
                        f"pattern {tok[:60]!r} (line {lineno}): more than {MAX_REGEX_PATTERNS} regular "
                        "expressions; combine them, or list the layer names as plain patterns"
                    )
            p = _make_pattern(tok, lineno, comment)
            if p.kind == "regex":
                total_size += p.size
                if total_size > MAX_REGEX_TOTAL_SIZE:
                    raise PatternError(
                        f"pattern {p.where()}: the regular expressions up to this line are too large "
                        f"together (over {MAX_REGEX_TOTAL_SIZE} elements with counted repeats expanded)"
                    )
            patterns.append(p)
    return patterns


def _runs(segments: Sequence[str], max_len: int | None = None) -> Iterable[str]:
    """Every contiguous run of whole segments (at most `max_len` of them), joined with dots."""
    n = len(segments)
    for i in range(n):
        for j in range(i + 1, n + 1 if max_len is None else min(n, i + max_len) + 1):
            yield ".".join(segments[i:j])


class PatternSet:
    """Compiled patterns with an index so that many patterns x many names stays fast.

    ``match(name)`` returns the indices (into ``patterns``) of every pattern that matches,
    in order, so the first one is the deciding pattern and unmatched patterns can be listed.
    """

    def __init__(self, patterns: Sequence[Pattern]):
        self.patterns = list(patterns)
        self._plain: dict[str, list[int]] = {}
        self._glob_by_segment: dict[str, list[int]] = {}
        self._scan: list[int] = []  # tried on every name (regexes, globs without a literal segment)
        for i, p in enumerate(self.patterns):
            if p.kind == "plain":
                self._plain.setdefault(strip_prefix(p.text), []).append(i)
            elif p.kind == "glob":
                literal = [s for s in strip_prefix(p.text).split(".") if not _GLOB_CHARS.search(s)]
                if literal:
                    # Longest literal segment: the most selective key.
                    self._glob_by_segment.setdefault(max(literal, key=len), []).append(i)
                else:
                    self._scan.append(i)
            else:
                self._scan.append(i)
        # Runs longer than the longest plain pattern cannot match it. Without this bound a tensor
        # name with thousands of dots (names come from untrusted files) took minutes: O(n^3).
        self._plain_max = max((k.count(".") + 1 for k in self._plain), default=0)
        self._budget = _rx.Budget()
        self._scan_any = None
        scan = [self.patterns[i] for i in self._scan]
        if (
            len(scan) > 8
            and all(p.regex.groups == 0 for p in scan)
            and sum(p.size for p in scan) <= MAX_REGEX_SIZE
        ):
            # One combined regex rejects most names in a single C-level search. Only without
            # groups (combining would renumber backreferences) and small enough to compile fast.
            try:
                self._scan_any = _rx.engine.compile("|".join(f"(?:{p.regex.pattern})" for p in scan))
            except _rx.engine.error:
                self._scan_any = None

    def __len__(self) -> int:
        return len(self.patterns)

    def match(self, name: str) -> list[int]:
        segments = name.split(".")
        hits: set[int] = set()
        if self._plain:
            for run in _runs(segments, self._plain_max):
                idx = self._plain.get(run)
                if idx:
                    hits.update(idx)
        if self._glob_by_segment:
            for seg in set(segments):
                for i in self._glob_by_segment.get(seg, ()):
                    if self._try(i, name):
                        hits.add(i)
        if self._scan and (self._scan_any is None or self._prefilter(name)):
            for i in self._scan:
                if self._try(i, name):
                    hits.add(i)
        return sorted(hits)

    def _try(self, i: int, name: str) -> bool:
        p = self.patterns[i]
        return _rx.search(p.where(), p.regex, name, self._budget)

    def _prefilter(self, name: str) -> bool:
        """The combined regex; one that runs long is dropped (each pattern then runs alone, so an
        error names the pattern at fault) after at most half of the budget left."""
        t0 = time.perf_counter()
        try:
            try:
                hold = min(_rx.HOLD_GIL_S, self._budget.left / 2)
                return self._scan_any.search(name, timeout=hold) is not None
            except TimeoutError:
                left = self._budget.left / 2 - (time.perf_counter() - t0)
                if left <= 0:
                    raise
                return self._scan_any.search(name, timeout=left, concurrent=True) is not None
        except TimeoutError:
            self._scan_any = None
            return True
        finally:
            self._budget.left -= time.perf_counter() - t0

    def first(self, name: str) -> Pattern | None:
        hits = self.match(name)
        return self.patterns[hits[0]] if hits else None
