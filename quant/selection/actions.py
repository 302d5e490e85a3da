"""What a line of the ignored-layers text asks for: the per-layer precision syntax.

A line may start with one of these words and a colon; a line without one keeps its layers:

    x_embedder                      # kept in the compute dtype (bf16/fp16), as always
    keep: final_layer               # the same, said explicitly
    weights-only: self_attn         # weights stored in the format, activations stay bf16 (W8A16 / W4A16)
    quantize: blocks.0.ffn          # weights and activations quantized where the hardware has it

When several lines match a layer, the LAST one decides, so lines written below the `# auto`
defaults override them (e.g. a bare ``self_attn`` line keeps attention in bf16 again). The size
and format rules still apply to layers a `weights-only:`/`quantize:` line selects: a layer too
small or of a shape the format cannot store stays in the compute dtype.

The split keeps every line where it was (other lines are blanked), so line numbers in messages are
the lines the user typed.
"""

from __future__ import annotations

import re

from .patterns import Pattern, parse_patterns

KEEP = "keep"
WEIGHTS_ONLY = "weights-only"
QUANTIZE = "quantize"
ACTIONS = (KEEP, WEIGHTS_ONLY, QUANTIZE)

# `word:` at the start of a line; `re:` is a pattern, not an action.
_PREFIX = re.compile(r"^\s*([A-Za-z][A-Za-z-]*)\s*:(?!//)")


def split_actions(text: str) -> dict[str, str]:
    """{action: the text of that action's lines}, every text with the original line count, so a
    pattern keeps its line number. Unknown words before a colon are left to the pattern parser
    (which names the line: layer names have no ':')."""
    lines = text.splitlines()
    out = {a: [""] * len(lines) for a in ACTIONS}
    for i, raw in enumerate(lines):
        m = _PREFIX.match(raw)
        word = m.group(1).lower() if m else ""
        if word in ACTIONS:
            out[word][i] = raw[m.end() :]
        else:
            out[KEEP][i] = raw
    return {a: "\n".join(v) for a, v in out.items()}


def parse_lines(text: str) -> list[tuple[Pattern, str]]:
    """(pattern, action) for every pattern of a text, in line order."""
    parts = split_actions(text)
    parsed = [(p, a) for a in ACTIONS for p in parse_patterns(parts[a])]
    return sorted(parsed, key=lambda pa: pa[0].line)


def line_prefix(action: str) -> str:
    """How a rule of this action is written in a text ("" for keep, the default)."""
    return "" if action == KEEP else f"{action}: "


__all__ = ["ACTIONS", "KEEP", "QUANTIZE", "WEIGHTS_ONLY", "line_prefix", "parse_lines", "split_actions"]
