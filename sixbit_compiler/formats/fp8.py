"""FP8 e4m3 with one fp32 scale per row (per token), the same scaling rule as INT8.

scale = amax / 448 (one IEEE division), values = e4m3(x · fp32(1 / scale)) with torch's
round-to-nearest-even conversion. A row holding NaN gets a NaN scale and zero codes; an
all-zero row gets scale 0. Used for the compact block-cache residuals, and the FP8 tier.
"""

from __future__ import annotations

import torch

from ._common import as_fp32, div_exact, nan_free_abs, saturate_fp32

FP8_E4M3_MAX = 448.0


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (float8_e4m3fn codes [..., K], fp32 scale [..., 1])."""
    xf = as_fp32(x)
    amax = nan_free_abs(xf).amax(dim=-1, keepdim=True)
    has_nan = torch.isnan(xf).any(dim=-1, keepdim=True)
    scale = div_exact(amax, FP8_E4M3_MAX)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = (torch.nan_to_num(xf, nan=0.0) * (torch.ones_like(safe) / safe)).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    scale = torch.where(has_nan, torch.full_like(scale, float("nan")), scale)
    return scaled.to(torch.float8_e4m3fn), scale


def dequantize_fp8_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return saturate_fp32(codes.to(torch.float32) * scale).to(dtype)
