"""The verdict on each node of tests/support/model_nodes.py and the table of docs/model_nodes.md.

A node on a family is:
- works: every quantized run finished with a finite result whose error against the unquantized
  run is at most ERR_FACTOR times the plain path's error (loader -> KSampler, no node between:
  what quantization alone costs), and which the node moved away from the plain path as far as it
  does unquantized (so a patch the quantized model drops or garbles shows);
- refuses: a quantized run stopped with the pack's own error (a message naming what and why);
- n.a.: the node cannot be built here, is for another model family, fails on the unquantized model
  too, or changes nothing on this model (its result equals the plain path's, quantized or not);
- broken: anything else (another error, NaN, an error or effect out of bounds). The test fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from model_nodes import FORMATS, PLAIN, REFERENCE
from model_nodes_run import Outcome, finite, rel_err
from model_nodes_settings import NOTES, SAME_AS_PLAIN

from quant import errors as pack_errors

WORKS, REFUSES, NA, BROKEN = "works", "refuses", "n.a.", "broken"
ERR_FACTOR = 5.0  # CFG 8 (KSampler's default) alone triples the plain path's error
EFFECT_TOL = 0.2  # relative; plus the format's plain error (a weight patch is quantized again)
NO_EFFECT = 1e-4  # a result this close to the plain path's is the plain path's (float noise)


@dataclass
class Verdict:
    status: str
    errors: dict[str, float] = field(default_factory=dict)  # format -> error (works, refuses)
    detail: str = ""  # the evidence: error message, what failed, why n.a.


def _short(o: Outcome, n: int = 140) -> str:
    """The error on one line, with the node that raised it (the case's node, or what ran after it)."""
    msg = " ".join(o.error.split())
    msg = msg if len(msg) <= n else msg[: n - 1] + "…"
    return f"{o.error_type.rsplit('.', 1)[-1]} in {o.stage}: {msg}"


def is_refusal(o: Outcome) -> bool:
    """The pack's own error: one of quant.errors' classes, raised on purpose with a message."""
    module, _, name = o.error_type.rpartition(".")
    cls = getattr(pack_errors, name, None)
    return (
        module.endswith("quant.errors")
        and isinstance(cls, type)
        and issubclass(cls, pack_errors.OnlineQuantError)
    )


def classify(node: str, runs: dict[str, dict[str, Outcome]], skipped: str | None) -> Verdict:
    """The verdict on `node` from its outcomes per variant (`runs[variant][node]`, PLAIN included)."""
    if skipped is not None:
        return Verdict(NA, detail=skipped)
    ref = runs[REFERENCE][PLAIN if node in SAME_AS_PLAIN else node]
    quant = {f: runs[f][node] for f in FORMATS}
    if not ref.ok:
        if all(not q.ok and q.error_type == ref.error_type for q in quant.values()):
            return Verdict(NA, detail=f"fails unquantized too ({_short(ref)})")
        return Verdict(BROKEN, detail=f"fails unquantized ({_short(ref)}) but not quantized")
    failed = {f: q for f, q in quant.items() if not q.ok}
    if any(not is_refusal(q) for q in failed.values()):
        return Verdict(BROKEN, detail="; ".join(f"{f}: {_short(q)}" for f, q in failed.items()))
    plain = {v: runs[v][PLAIN].value for v in (REFERENCE, *FORMATS)}
    plain_err = {f: rel_err(plain[REFERENCE], plain[f]) for f in FORMATS}
    latent = not isinstance(ref.value, dict | float)
    eff = rel_err(plain[REFERENCE], ref.value) if latent else None
    errors, problems, qeffs = {}, [], []
    for f, q in quant.items():
        if not q.ok:
            continue
        err = errors[f] = rel_err(ref.value, q.value)
        if not finite(q.value):
            problems.append(f"{f}: non-finite result")
        elif err > ERR_FACTOR * plain_err[f]:
            problems.append(f"{f}: error {err:.1%}, over {ERR_FACTOR:g}x the plain path's {plain_err[f]:.1%}")
        if eff is not None:
            qeff = rel_err(plain[f], q.value)
            qeffs.append(qeff)
            if abs(qeff - eff) > EFFECT_TOL * eff + plain_err[f]:
                problems.append(
                    f"{f}: moves the result {qeff:.1%} from the plain path, unquantized {eff:.1%}"
                )
    if problems:
        return Verdict(BROKEN, errors, "; ".join(problems))
    if failed:  # the message without its first parenthesis (format, shapes), as it reads for all
        f, q = next(iter(failed.items()))
        message = re.sub(r" \([^()]*\)", "", " ".join(q.error.split()), count=1)
        return Verdict(REFUSES, errors, f"{', '.join(failed)}: {q.error_type.rsplit('.', 1)[-1]}: {message}")
    if (
        eff is not None
        and eff < NO_EFFECT
        and all(e < NO_EFFECT for e in qeffs)
        and node not in SAME_AS_PLAIN
    ):
        return Verdict(NA, errors, "no effect on this model: the same result as without the node")
    return Verdict(WORKS, errors)


def _pct(e: float) -> str:
    return "0" if e == 0 else f"{100 * e:.2g}%"


def _cell(v: Verdict) -> str:
    if v.status == WORKS:
        return f"works ({' / '.join(_pct(v.errors[f]) for f in FORMATS)})"
    return f"**{v.status}**" if v.status == BROKEN else v.status


def _note(label: str, by_family: dict[str, Verdict], titles: dict[str, str]) -> str:
    details = {k: v.detail for k, v in by_family.items() if v.detail}
    parts = [NOTES[label]] if label in NOTES else []
    if len(set(details.values())) == 1 and len(details) == len(by_family):
        parts.append(next(iter(details.values())))
    else:
        parts += [f"{titles[k]}: {d}" for k, d in details.items()]
    return "; ".join(parts).replace("|", "\\|").replace("\n", " ")


def counts(verdicts: dict[str, Verdict]) -> dict[str, int]:
    return {s: sum(v.status == s for v in verdicts.values()) for s in (WORKS, REFUSES, NA, BROKEN)}


def render(
    rows: list[tuple[str, str]],
    verdicts: dict[str, dict[str, Verdict]],
    titles: dict[str, str],
    plain_err: dict[str, dict[str, float]],
    command: str,
) -> str:
    """The markdown of docs/model_nodes.md. rows: (label, category); verdicts[family][label]."""
    fams = list(titles)
    summary = "; ".join(
        f"**{titles[k]}** "
        + ", ".join(f"{n} {s}" for s, n in counts(verdicts[k]).items() if n or s != BROKEN)
        for k in fams
    )
    plain = "; ".join(f"{titles[k]} {' / '.join(_pct(plain_err[k][f]) for f in FORMATS)}" for k in fams)
    lines = [
        "# Core nodes with a MODEL input, on a quantized model",
        "",
        "Every node of ComfyUI 0.8.0 that takes a MODEL (as its `/object_info` lists them), run in a",
        "real server on a tiny Wan 2.1 and a tiny Z-Image (ComfyUI's own model classes, two blocks,",
        "random weights) loaded by this pack in FP8 and in MXFP4, and on the same files loaded",
        "unquantized by ComfyUI's UNETLoader. A node that returns a MODEL is followed by a KSampler",
        "(2 steps, CFG 2); guiders, schedulers and samplers run in SamplerCustom(Advanced); save nodes",
        "are judged by the tensors they write.",
        "",
        "- **works (a / b)**: the relative L2 error of the result against the same graph on the",
        "  unquantized model, FP8 / MXFP4. For scale, the plain loader -> KSampler graph:",
        f"  {plain}. A result may be up to {ERR_FACTOR:g}x that far off (CFG amplifies",
        "  it), and must move away from the plain graph's result as far as it does unquantized.",
        "- **refuses**: the quantized run stops with a message that says why (the note quotes it).",
        "- **n.a.**: not applicable to these models; the note says why.",
        "",
        "The errors are those of tiny random-weight models: they compare nodes with each other, they",
        "are not image quality (docs/quality.md measures full-size models).",
        "",
        f"{summary}",
        "",
        f"Generated by `{command}`",
        "(one to three minutes on 2 CPU cores); the test fails if a node is broken or if this table's",
        "verdicts are not current.",
        "",
        f"| Node | Category | {' | '.join(titles[k] for k in fams)} | Note |",
        "|" + "---|" * (3 + len(fams)),
    ]
    for label, category in rows:
        by_family = {k: verdicts[k][label] for k in fams}
        cells = " | ".join(_cell(by_family[k]) for k in fams)
        lines.append(f"| `{label}` | {category or '(none)'} | {cells} | {_note(label, by_family, titles)} |")
    return "\n".join(lines) + "\n"


def statuses(markdown: str, n_families: int) -> dict[str, tuple[str, ...]]:
    """label -> status per family, read back from a table `render` wrote."""
    out = {}
    for line in markdown.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            out[cells[0].strip("`")] = tuple(c.split(" (")[0].strip("*") for c in cells[2 : 2 + n_families])
    return out
