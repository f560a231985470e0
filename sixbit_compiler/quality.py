"""Fidelity metrics between a run and its reference (no learned model involved).

All take tensors of the same shape; video tensors are ``[..., H, W]`` (SSIM is computed
per 2-D slice over the last two dimensions and averaged).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def relative_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(F.cosine_similarity(x.double().flatten(), ref.double().flatten(), dim=0))


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; the range defaults to the reference's max - min."""
    x, ref = x.double(), ref.double()
    rng = float(ref.max() - ref.min()) if data_range is None else data_range
    mse = float(((x - ref) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(rng**2 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float | None = None, window: int = 7) -> float:
    """Mean structural similarity over 2-D slices (uniform ``window``, the usual constants)."""
    x, ref = x.double(), ref.double()
    rng = float(ref.max() - ref.min()) if data_range is None else data_range
    h, w = ref.shape[-2:]
    win = min(window, h, w)
    a = x.reshape(-1, 1, h, w)
    b = ref.reshape(-1, 1, h, w)
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    mean = lambda t: F.avg_pool2d(t, win, stride=1)
    mu_a, mu_b = mean(a), mean(b)
    var_a = mean(a * a) - mu_a**2
    var_b = mean(b * b) - mu_b**2
    cov = mean(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def fidelity(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"psnr_db": psnr(x, ref), "ssim": ssim(x, ref), "relative_l2": relative_l2(x, ref), "cosine": cosine(x, ref)}
