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
    monkeypatch.setattr(quality.metrics, "CHUNK", 100)  # force many chunks, including a partial one
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


def test_psnr_hand_computed():
    ref = torch.zeros(1, 4, 4, 3)
    test = torch.full_like(ref, 0.1)  # MSE 0.01 -> 20 dB at range 1
    assert quality.psnr_db(ref, test) == pytest.approx(20.0)
    assert quality.psnr_db(ref, test, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2.0))
    assert quality.psnr_db(ref, ref) == math.inf


def test_ssim_constant_images_match_formula():
    # Constant images: sigma = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.2, 0.6
    ref = torch.full((2, 16, 16, 3), a)
    test = torch.full((2, 16, 16, 3), b)
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert quality.ssim(ref, test) == pytest.approx(expected, rel=1e-4)


def test_ssim_identity_symmetry_and_noise_order():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 32, 32, 3, generator=g)
    little = (img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    lots = (img + 0.2 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    assert quality.ssim(img, img) == pytest.approx(1.0, abs=1e-5)
    assert quality.ssim(img, little) == pytest.approx(quality.ssim(little, img), abs=1e-6)
    assert 1.0 > quality.ssim(img, little) > quality.ssim(img, lots)


def test_ssim_video_and_channels_first_layouts_agree():
    g = torch.Generator().manual_seed(2)
    vid = torch.rand(1, 3, 16, 16, 3, generator=g)  # [B, T, H, W, C]
    noisy = (vid + 0.1 * torch.randn(vid.shape, generator=g)).clamp(0, 1)
    frames = quality.ssim(vid, noisy, batch_chunk=2)
    cf = quality.ssim(vid[0].movedim(-1, 1), noisy[0].movedim(-1, 1), channels_last=False)
    assert frames == pytest.approx(cf, abs=1e-6)


def test_channel_sqnr_per_row():
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    test = torch.tensor([[3.0, 3.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    got = quality.channel_sqnr_db(ref, test)
    assert got[0] == pytest.approx(10 * math.log10(25.0))
    assert got[1] == math.inf and got[2] == math.inf and got[3] == -math.inf
