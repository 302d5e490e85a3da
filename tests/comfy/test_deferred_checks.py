"""On a GPU the loader queues each layer's NaN/Inf verdict and SQNR sums and reads them once at
the end of the load (nodes/load_state.py), so reading the next layer overlaps the GPU's work.
Here that path runs on the CPU (`defers_checks` forced on): same weights, same report, and a
non-finite weight still stops the load naming its layer, leaving no model behind."""

from __future__ import annotations

import gc
import math
import re

import helpers_models as hm
import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def mods(pack):
    return hm.import_submodules(pack, "nodes.loader", "nodes.ops", "quant.errors")


@pytest.fixture(scope="module")
def wan_file(comfyui_path, tmp_path_factory):
    return hm.save_model(hm.wan_model(seed=5), tmp_path_factory.mktemp("wand") / "wan_tiny.safetensors")


def _weights(mp):
    return {
        n: (m.weight._qdata.clone(), m.weight._params.scale.clone())
        for n, m in mp.model.diffusion_model.named_modules()
        if getattr(m, "_oq_format", None)
    }


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
def test_deferred_checks_give_the_same_model_and_report(mods, wan_file, monkeypatch, fmt):
    load = mods.nodes.loader.load_quantized
    mp0, rep0 = load(str(wan_file), fmt, "")
    monkeypatch.setattr(mods.nodes.ops, "defers_checks", lambda device: True)
    mp1, rep1 = load(str(wan_file), fmt, "")
    w0, w1 = _weights(mp0), _weights(mp1)
    assert w0.keys() == w1.keys() and w0
    for k in w0:
        assert w0[k][0].view(torch.uint8).equal(w1[k][0].view(torch.uint8)) and w0[k][1].equal(w1[k][1]), k
    s0 = {r.name: r.sqnr_db for r in rep0.quantized()}
    s1 = {r.name: r.sqnr_db for r in rep1.quantized()}
    assert s0.keys() == s1.keys()
    for k in s0:
        assert s1[k] is not None and math.isfinite(s1[k]) and s1[k] == pytest.approx(s0[k], abs=1e-3), k


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "mxfp4"])
def test_deferred_non_finite_weight_stops_the_load_naming_it(
    pack, mods, wan_file, tmp_path, monkeypatch, fmt
):
    sd = load_file(str(wan_file))
    layer = "blocks.1.ffn.0"
    sd[f"{layer}.weight"] = sd[f"{layer}.weight"].clone()
    sd[f"{layer}.weight"][3, 5] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(sd, str(bad))
    monkeypatch.setattr(mods.nodes.ops, "defers_checks", lambda device: True)
    created, restore = hm.spy_online_linears(pack)
    try:
        with pytest.raises(pack.quant.errors.NonFiniteWeightError, match=re.escape(repr(layer))) as ei:
            mods.nodes.loader.load_quantized(str(bad), fmt, "")
    finally:
        restore()
    msg = str(ei.value)
    del ei  # its traceback holds the frames (and the half-built model) alive
    assert "NaN or Inf" in msg and "ignored layers" in msg
    gc.collect()
    assert created and all(r() is None for r in created), "a half-built model survived"
