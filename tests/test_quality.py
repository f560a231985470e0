"""Fidelity metrics: known answers, and they fail on wrong inputs."""

import math

import torch

from sixbit_compiler.quality import cosine, fidelity, psnr, relative_l2, ssim


def test_identical_inputs():
    x = torch.randn(2, 3, 16, 16)
    f = fidelity(x, x)
    assert f["psnr_db"] == math.inf and abs(f["ssim"] - 1) < 1e-9 and f["relative_l2"] == 0 and abs(f["cosine"] - 1) < 1e-9


def test_known_psnr():
    ref = torch.zeros(100)
    ref[0] = 1.0  # range 1
    x = ref + 0.1  # mse 0.01 -> 20 dB
    assert abs(psnr(x, ref) - 20.0) < 1e-5


def test_metrics_degrade_with_noise_and_catch_wrong_videos():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 32, 32, generator=g)
    small = ref + 0.01 * torch.randn(4, 32, 32, generator=g)
    large = ref + 0.5 * torch.randn(4, 32, 32, generator=g)
    assert psnr(small, ref) > psnr(large, ref) + 20
    assert ssim(small, ref) > 0.99 > 0.8 > ssim(large, ref)
    assert relative_l2(small, ref) < 0.02 and relative_l2(large, ref) > 0.4
    other = torch.randn(4, 32, 32, generator=g)
    assert abs(cosine(other, ref)) < 0.1 and ssim(other, ref) < 0.1
