"""The verdicts of the conformance table (tests/support/model_nodes_table.py) on made-up outcomes:
each kind of broken result the table claims to catch is caught, and nothing else is called broken."""

from __future__ import annotations

import torch
from model_nodes import FORMATS, PLAIN, REFERENCE
from model_nodes_run import Outcome
from model_nodes_table import BROKEN, NA, REFUSES, WORKS, classify, is_refusal, render, statuses

NODE = "SomeNode"
PACK_ERROR = "/x/custom_nodes/ComfyUI-OnlineQuant.quant.errors.PackedWeightError"


def _runs(node: dict[str, Outcome]) -> dict[str, dict[str, Outcome]]:
    """Plain path: the unquantized latent, and the quantized ones 1% (FP8) and 5% (MXFP4) off."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 16, 8, 8, generator=g)
    plain = {REFERENCE: ref}
    for f, err in zip(FORMATS, (0.01, 0.05), strict=True):
        plain[f] = ref + err * ref.norm() / ref.numel() ** 0.5 * torch.randn(ref.shape, generator=g)
    return {v: {PLAIN: Outcome(value=plain[v]), NODE: node[v]} for v in (REFERENCE, *FORMATS)}


def _moved(runs: dict, scale: float) -> dict[str, Outcome]:
    """Each variant's plain result with the same change made by the node (scale * the result)."""
    return {v: Outcome(value=runs[v][PLAIN].value * (1 + scale)) for v in runs}


def test_works_refuses_and_not_applicable():
    base = _runs({v: Outcome() for v in (REFERENCE, *FORMATS)})
    works = classify(NODE, _runs(_moved(base, 0.3)), None)
    assert works.status == WORKS and works.errors[FORMATS[0]] < works.errors[FORMATS[1]] < 0.1
    assert classify(NODE, _runs(_moved(base, 0.0)), None).status == NA  # no effect anywhere
    assert classify(NODE, base, "needs a thing").status == NA
    failing = {v: Outcome(error="no in_channels", error_type="AttributeError") for v in base}
    assert classify(NODE, _runs(failing), None).status == NA  # fails unquantized too
    refusing = {REFERENCE: Outcome(value=base[REFERENCE][PLAIN].value)}
    refusing |= {
        f: Outcome(error="a quantized weight has no plain memory", error_type=PACK_ERROR) for f in FORMATS
    }
    verdict = classify(NODE, _runs(refusing), None)
    assert verdict.status == REFUSES and "PackedWeightError" in verdict.detail


def test_broken_results_are_caught():
    base = _runs({v: Outcome() for v in (REFERENCE, *FORMATS)})
    moved = _moved(base, 0.3)
    nan = dict(moved, mxfp4=Outcome(value=torch.full_like(moved["mxfp4"].value, float("nan"))))
    assert classify(NODE, _runs(nan), None).status == BROKEN
    lost = dict(moved, fp8_e4m3fn=Outcome(value=base["fp8_e4m3fn"][PLAIN].value))  # the patch was dropped
    assert "moves the result" in classify(NODE, _runs(lost), None).detail
    garbage = dict(moved, fp8_e4m3fn=Outcome(value=-moved["fp8_e4m3fn"].value))
    assert classify(NODE, _runs(garbage), None).status == BROKEN
    crash = dict(
        moved,
        mxfp4=Outcome(error="'Linear' object has no attribute 'weight_scale'", error_type="AttributeError"),
    )
    assert classify(NODE, _runs(crash), None).status == BROKEN  # not the pack's own error
    only_quantized = {REFERENCE: Outcome(error="x", error_type="KeyError")} | {f: moved[f] for f in FORMATS}
    assert classify(NODE, _runs(only_quantized), None).status == BROKEN


def test_refusal_is_only_the_packs_own_error():
    assert is_refusal(Outcome(error="m", error_type=PACK_ERROR))
    assert not is_refusal(Outcome(error="m", error_type="RuntimeError"))
    assert not is_refusal(Outcome(error="m", error_type="some.other.quant.errors.Thing"))


def test_the_table_reads_back():
    base = _runs({v: Outcome() for v in (REFERENCE, *FORMATS)})
    verdicts = {
        "a": {NODE: classify(NODE, _runs(_moved(base, 0.3)), None)},
        "b": {NODE: classify(NODE, base, "why")},
    }
    text = render(
        [(NODE, "cat")],
        verdicts,
        {"a": "A", "b": "B"},
        {"a": {f: 0.01 for f in FORMATS}} | {"b": {f: 0.02 for f in FORMATS}},
        "cmd",
    )
    assert statuses(text, 2) == {NODE: (WORKS, NA)}
    assert "**A** 1 works, 0 refuses, 0 n.a." in text and "B: why" in text
