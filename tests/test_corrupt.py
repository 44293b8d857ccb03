"""The bn-shift corruptions, each against an independent oracle (torch.rot90, slicing, the formula)."""

from __future__ import annotations

import pytest
import torch

from bnlab.data.corrupt import CORRUPTIONS, LEVELS, SEVERITIES, corrupt, rotate, translate


@pytest.fixture(scope="module")
def digits():
    from bnlab.data import load_dataset
    return load_dataset("mnist-5k", scaling="unit").x_test[:200]


def test_rotation_by_90_degrees_is_rot90_exactly():
    x = torch.rand(3, 2, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, torch.full((3,), 90.0)), torch.rot90(x, 1, dims=(2, 3)), atol=1e-12, rtol=0)
    torch.testing.assert_close(rotate(x, torch.full((3,), -90.0)), torch.rot90(x, -1, dims=(2, 3)), atol=1e-12, rtol=0)
    torch.testing.assert_close(rotate(x, torch.zeros(3)), x, atol=1e-12, rtol=0)


def test_translation_moves_whole_pixels_with_zeros_shifted_in():
    x = torch.arange(2 * 1 * 5 * 6, dtype=torch.float32).view(2, 1, 5, 6) + 1
    out = translate(x, torch.tensor([2.0, -1.0]), torch.tensor([-3.0, 1.0]))
    torch.testing.assert_close(out[0, 0, 2:, :3], x[0, 0, :3, 3:])
    assert float(out[0, 0, :2].abs().sum()) == 0 and float(out[0, 0, :, 3:].abs().sum()) == 0
    torch.testing.assert_close(out[1, 0, :4, 1:], x[1, 0, 1:, :5])
    assert float(out[1, 0, 4].abs().sum()) == 0 and float(out[1, 0, :, 0].abs().sum()) == 0


def test_contrast_brightness_and_noise_follow_their_formulas():
    x = torch.full((4, 1, 8, 8), 0.5)
    x[:, :, 2:6, 2:6] = 0.7
    c = corrupt(x, "contrast", 2)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(c, mean + LEVELS["contrast"][1] * (x - mean))
    torch.testing.assert_close(corrupt(x, "brightness", 1), (x + 0.2).clamp(0, 1))
    gray = torch.full((64, 1, 28, 28), 0.5)
    noise = corrupt(gray, "gaussian_noise", 1) - gray  # sigma 0.1: clipping at 0 / 1 is 5 sigma away
    assert float(noise.std()) == pytest.approx(0.1, rel=0.02) and abs(float(noise.mean())) < 0.002


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_is_deterministic_in_range_and_grows_with_severity(digits, kind):
    outs = [corrupt(digits, kind, s, seed=3) for s in SEVERITIES]
    for o in outs:
        assert o.shape == digits.shape and float(o.min()) >= 0 and float(o.max()) <= 1
    torch.testing.assert_close(corrupt(digits, kind, 2, seed=3), outs[1], atol=0, rtol=0)
    change = [float((o - digits).abs().mean()) for o in outs]
    assert 0 < change[0] < change[1] < change[2], change
    if kind in ("gaussian_noise", "rotation", "translation"):  # random draws: another seed, other images
        assert not torch.equal(corrupt(digits, kind, 2, seed=4), outs[1])


def test_bad_requests_say_what_was_expected():
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown corruption 'fog': expected one of gaussian_noise"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match=r"severity must be one of \(1, 2, 3\) \(got 4\)"):
        corrupt(x, "contrast", 4)
    with pytest.raises(ValueError, match="expected images scaled to \\[0, 1\\]"):
        corrupt(x * 255, "contrast", 1)
    with pytest.raises(ValueError, match="expected float images of shape"):
        corrupt(torch.rand(2, 16), "contrast", 1)
