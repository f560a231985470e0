"""Helpers shared by the format modules."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 copy of ``x`` with ±Inf saturated to the largest finite value of x's dtype."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"sixbit formats take float32/float16/bfloat16 tensors, got {x.dtype}")
    limit = torch.finfo(x.dtype).max
    x = x.to(torch.float32)
    return torch.nan_to_num(x, nan=float("nan"), posinf=limit, neginf=-limit)


def pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dimension of ``x`` up to a multiple of ``multiple``."""
    k = x.shape[-1]
    padded = -(-k // multiple) * multiple
    if padded == k:
        return x
    return torch.nn.functional.pad(x, (0, padded - k))


def div_exact(x: torch.Tensor, constant: float) -> torch.Tensor:
    """x / constant with IEEE division on every device.

    PyTorch's CUDA kernels divide by a Python scalar as a multiplication by its reciprocal,
    which can differ by an ulp from true division (and from the kernels, which use IEEE
    division). Dividing by a tensor keeps the spec the same on CPU and GPU.
    """
    return x / torch.full_like(x, constant)


def saturate_fp32(x: torch.Tensor) -> torch.Tensor:
    """Clamp to the finite fp32 range (decoding a saturated Inf can round past it); NaN stays NaN."""
    limit = torch.finfo(torch.float32).max
    return x.clamp(-limit, limit)


def nan_free_abs(x: torch.Tensor) -> torch.Tensor:
    """|x| with NaN replaced by 0, for amax reductions that must ignore NaN."""
    a = x.abs()
    return torch.where(torch.isnan(a), torch.zeros_like(a), a)
