"""Symmetric INT8 quantization with one fp32 scale per row.

Activations use it per token and weights per output channel: in both cases the
scale group is a row along K, the last dimension (``axis=-1``).
"""

from __future__ import annotations

import torch

from ._common import as_fp32, div_exact, nan_free_abs, saturate_fp32

INT8_MAX = 127.0


def quantize_int8(x: torch.Tensor, axis: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to int8 with one scale per slice along ``axis``.

    Returns ``(codes int8, scale fp32)``; ``scale`` keeps ``axis`` with size 1 so that
    ``codes * scale`` broadcasts. scale = amax / 127 and codes =
    round-half-even(x · fp32(1 / scale)) in [-127, 127] (-128 is never used, so the range is symmetric). A slice holding NaN
    gets a NaN scale and zero codes; an all-zero slice gets scale 0 and zero codes.
    """
    xf = as_fp32(x)
    amax = nan_free_abs(xf).amax(dim=axis, keepdim=True)
    has_nan = torch.isnan(xf).any(dim=axis, keepdim=True)
    scale = div_exact(amax, INT8_MAX)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    inv = torch.ones_like(safe) / safe  # one IEEE division per row; kernels do the same
    codes = torch.round(xf * inv).clamp_(-INT8_MAX, INT8_MAX)
    codes = torch.nan_to_num(codes, nan=0.0).to(torch.int8)
    scale = torch.where(has_nan, torch.full_like(scale, float("nan")), scale)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes * scale, in ``dtype`` (saturating at the fp32 range; NaN stays NaN)."""
    return saturate_fp32(codes.to(torch.float32) * scale).to(dtype)
