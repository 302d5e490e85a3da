"""The regex engine behind the ignore patterns, with bounded cost (see quant/selection/patterns.py).

The `regex` package (the syntax of Python's `re`) because its searches take a timeout and can
release the GIL; Python's own `re` parser checks each pattern first, because it measures counted
repeats without expanding them, which the `regex` compiler does (``(a{1000}){1000}`` would take
gigabytes)."""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Iterable
from typing import Any

import regex as engine

from ..errors import PatternError

try:  # the parser of Python's own `re`: checks the syntax and sizes without expanding anything
    from re import _parser as _sre_parse
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

MAX_PATTERN_CHARS = 1000  # a layer name is rarely 200 characters; longer patterns are not names
MAX_REGEX_PATTERNS = 1000  # 're:' patterns in one text (thousands of exact names are plain patterns)
MAX_REGEX_SIZE = 10_000  # a regex's size with counted repeats expanded ('a{100}' is 100)
MAX_REGEX_TOTAL_SIZE = 100_000  # the same, summed over every regex of one text
HOLD_GIL_S = 0.02  # longest one search holds the GIL before it goes on with the GIL released
MATCH_BUDGET_S = 5.0  # all the glob and regex searches of one pattern set together


class Budget:
    """Seconds of searching left to one pattern set (or to one direct `Pattern.matches`)."""

    def __init__(self) -> None:
        self.left = MATCH_BUDGET_S


def search(where: str, rx: Any, name: str, budget: Budget) -> bool:
    """`rx.search(name)`, bounded: at most HOLD_GIL_S with the GIL held, then with it released,
    all within `budget`; a search that exhausts it is a PatternError naming the pattern (`where`:
    its text and line)."""
    t0 = time.perf_counter()
    try:
        try:
            return rx.search(name, timeout=max(0.0, min(HOLD_GIL_S, budget.left))) is not None
        except TimeoutError:
            left = budget.left - (time.perf_counter() - t0)
            if left <= 0:
                raise
            return rx.search(name, timeout=left, concurrent=True) is not None
    except TimeoutError:
        budget.left = 0.0
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise PatternError(
            f"pattern {where} took more than {MATCH_BUDGET_S:g} s to match the layer names "
            f"(it was trying {shown!r}); a regular expression with nested repeats such as '(.*)*' "
            "can take exponential time: simplify it, e.g. match whole names or segments"
        ) from None
    finally:
        budget.left -= time.perf_counter() - t0


def _expanded_size(items: Any) -> int:
    """The size of a parsed `re` pattern with counted repeats expanded, the measure of what the
    `regex` compiler may build ('(a{1000}){1000}' is 10**6; an unbounded repeat counts its
    minimum, at least once)."""
    total = 0
    for op, av in items:
        if op in _REPEATS:
            lo, hi, sub = av
            n = hi if hi != _sre_parse.MAXREPEAT else max(lo, 1)
            total += max(n, 1) * _expanded_size(sub)
        else:
            total += 1 + sum(_expanded_size(x) for x in _subpatterns(av))
        if total > MAX_REGEX_SIZE:
            return total
    return total


def _subpatterns(av: Any) -> Iterable[Any]:
    if isinstance(av, _sre_parse.SubPattern):
        yield av
    elif isinstance(av, (tuple, list)):
        for x in av:
            yield from _subpatterns(x)


_REPEATS = {
    getattr(_sre_parse, op)
    for op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
    if hasattr(_sre_parse, op)
}


def compile_regex(body: str, token: str, line: int) -> tuple[Any, int]:
    """A user's regex, compiled with the `regex` engine after Python's own `re` parser checked
    its syntax and its expanded size: -> (compiled, size). Any failure is a PatternError."""
    def bad(why: str) -> PatternError:
        return PatternError(f"pattern {token!r} (line {line}) is not a valid regular expression: {why}")

    if len(body) > MAX_PATTERN_CHARS:
        raise PatternError(
            f"pattern {token[:60]!r}... (line {line}) is {len(body)} characters long; at most "
            f"{MAX_PATTERN_CHARS}: split it into several patterns"
        )
    try:
        with warnings.catch_warnings():
            # e.g. "possible nested set": valid today; not worth a console line per load
            warnings.simplefilter("ignore", FutureWarning)
            size = _expanded_size(_sre_parse.parse(body))
            if size > MAX_REGEX_SIZE:
                raise PatternError(
                    f"pattern {token!r} (line {line}): counted repeats make this regular expression too "
                    f"large (over {MAX_REGEX_SIZE} elements once expanded); use '*' or '+', or smaller counts"
                )
            return engine.compile(body), size
    except re.error as e:
        raise bad(str(e)) from None
    except engine.error as e:
        raise bad(str(e)) from None
    except (OverflowError, RecursionError, MemoryError, ValueError, TypeError) as e:  # 'x{4294967296}'
        if isinstance(e, PatternError):
            raise
        raise bad(f"{type(e).__name__}: {e}") from None
