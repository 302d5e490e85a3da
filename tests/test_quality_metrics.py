"""quant/quality.py metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from quant import quality


def test_sqnr_hand_computed():
    ref = torch.tensor([3.0, 4.0])  # signal 25
    test = torch.tensor([3.0, 3.0])  # noise 1
    assert quality.sqnr_db(ref, test) == pytest.approx(10 * math.log10(25.0))


def test_sqnr_exact_is_inf_and_zero_signal_is_minus_inf():
    x = torch.randn(7, 5)
    assert quality.sqnr_db(x, x.clone()) == math.inf
    assert quality.weight_sqnr_db(x, x.clone()) == math.inf
    assert quality.sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    assert quality.sqnr_db(torch.zeros(3), torch.zeros(3)) == math.inf


def test_sqnr_chunked_matches_direct(monkeypatch):
    monkeypatch.setattr(quality, "_CHUNK", 100)  # force many chunks, including a partial one
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(37, 29, generator=g)
    test = ref + 0.01 * torch.randn(37, 29, generator=g)
    direct = 10 * math.log10(float((ref.double() ** 2).sum() / ((ref - test).double() ** 2).sum()))
    assert quality.sqnr_db(ref, test) == pytest.approx(direct, abs=1e-4)


def test_sqnr_bf16_inputs_accumulate_in_fp32():
    # 2^20 ones in bf16: a bf16 accumulator would saturate at 256; fp32 chunks do not.
    ref = torch.ones(1 << 20, dtype=torch.bfloat16)
    test = torch.full_like(ref, 0.5)
    assert quality.sqnr_db(ref, test) == pytest.approx(10 * math.log10(4.0), abs=1e-6)


def test_sqnr_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape mismatch"):
        quality.sqnr_db(torch.zeros(2, 3), torch.zeros(3, 2))


def test_relative_l2_hand_computed():
    ref = torch.tensor([3.0, 4.0])
    test = torch.tensor([3.0, 3.0])
    assert quality.relative_l2(ref, test) == pytest.approx(1 / 5)
    assert quality.relative_l2(ref, ref) == 0.0
