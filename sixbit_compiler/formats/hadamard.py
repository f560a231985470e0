"""Block Hadamard rotation (blocks of 128 along K).

Rotating activations and weights by the same orthonormal matrix leaves the
product unchanged, x·Wᵀ = (xH)(WH)ᵀ, while spreading outliers across the block,
which makes both easier to quantize. The weight is rotated once, before NVFP4
quantization; the activation is rotated on every call.
"""

from __future__ import annotations

import functools

import torch

from ._common import pad_last

HADAMARD_BLOCK = 128


@functools.lru_cache(maxsize=None)
def _hadamard_cpu(n: int) -> torch.Tensor:
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:  # Sylvester construction
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(torch.float32)


def hadamard_matrix(n: int = HADAMARD_BLOCK, device=None) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix of size n (fp32, symmetric, H·H = I)."""
    return _hadamard_cpu(n).to(device) if device is not None else _hadamard_cpu(n)


def hadamard_rotate(x: torch.Tensor, block: int = HADAMARD_BLOCK) -> torch.Tensor:
    """Rotate the last dim of ``x`` blockwise: returns fp32, last dim padded to a multiple of ``block``.

    Applying it twice returns the (padded) input: the matrix is symmetric and orthonormal.
    """
    x = pad_last(x.to(torch.float32), block)
    h = hadamard_matrix(block, x.device)
    shape = x.shape
    return (x.reshape(*shape[:-1], shape[-1] // block, block) @ h).reshape(shape)
