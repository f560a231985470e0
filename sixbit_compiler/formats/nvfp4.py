"""NVFP4: 4-bit e2m1 values, one e4m3 scale per 16 values, one fp32 scale per tensor.

Layout (the convention of torchao and Triton):

* ``packed``: uint8 ``[..., Kp/2]``, two e2m1 codes per byte, element 2i in the
  **low** nibble. A code is ``sign << 3 | magnitude_index`` with magnitudes
  ``E2M1_VALUES = (0, 0.5, 1, 1.5, 2, 3, 4, 6)``.
* ``block_scales``: ``float8_e4m3fn`` ``[..., Kp/16]``, one per 16 consecutive
  values along the last dimension.
* ``tensor_scale``: fp32 scalar = amax / (448 · 6), so that block scales use the
  whole e4m3 range.

``Kp`` is K rounded up to a multiple of 16 (the tail is zero-padded).

A value decodes as ``E2M1[code] · block_scale · tensor_scale``. The product
``E2M1[code] · block_scale`` is exactly representable in bf16 (not always in
e4m3), which is what lets Hopper run NVFP4 math exactly through bf16 tensor
cores: see :func:`nvfp4_block_values`.

Rounding: the block scale is ``(block_amax / 6) / tensor_scale`` rounded to
nearest-even e4m3; each value is multiplied (in fp32) by the reciprocal of the
*rounded* block scale times the tensor scale (one IEEE division per block) and rounded to the nearest e2m1 value, ties to even (even = mantissa bit 0, i.e. an
even magnitude index), saturating at ±6.
"""

from __future__ import annotations

import torch

from ._common import as_fp32, div_exact, nan_free_abs, pad_last, saturate_fp32
from .fp8 import quantize_fp8_rows
from .int8 import quantize_int8

NVFP4_BLOCK = 16
F4_E2M1_MAX = 6.0
F8_E4M3_MAX = 448.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Round-to-nearest-even boundaries on |x|, see _encode_e2m1.
_LE_BOUNDS = (0.25, 1.25, 2.5, 5.0)  # ties round *down* to the even neighbour
_LT_BOUNDS = (0.75, 1.75, 3.5)  # ties round *up* to the even neighbour


def _encode_e2m1(scaled: torch.Tensor) -> torch.Tensor:
    """fp32 values already divided by their scales -> uint8 codes 0..15 (NaN -> 0)."""
    mag = scaled.abs()
    idx = torch.zeros_like(mag, dtype=torch.uint8)
    for b in _LE_BOUNDS:
        idx += (mag > b).to(torch.uint8)
    for b in _LT_BOUNDS:
        idx += (mag >= b).to(torch.uint8)
    negative = (scaled < 0) & (idx > 0)
    return idx | (negative.to(torch.uint8) << 3)


def _decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


#: Block scales tried by ``quantize_nvfp4(..., scale_search=True)``: the amax rule's e4m3 scale
#: moved by these many e4m3 steps (positive e4m3 bit patterns are ordered like their values;
#: one step is 1/8 to 1/16 of an octave). 0 comes first, so ties keep the amax rule. Going up
#: to +6 (the block's amax lands near 3.5 instead of 6) trades a coarser top for finer small
#: values; -1 clips the amax a little. On the reference model's weights this range gave
#: 21.8 dB mean SQNR against the amax rule's 20.3 dB (0..+4: 21.3 dB; -3..+6: 21.8 dB).
SCALE_SEARCH_STEPS = (0, -1, 1, 2, 3, 4, 5, 6)


def _encode_blocks(blocks: torch.Tensor, block_scales: torch.Tensor, ts_safe: torch.Tensor) -> torch.Tensor:
    """fp32 blocks [..., nb, 16] and their e4m3 block scales -> e2m1 codes [..., nb, 16]."""
    denom = (block_scales.to(torch.float32) * ts_safe).unsqueeze(-1)
    safe_denom = torch.where(denom > 0, denom, torch.ones_like(denom))  # NaN compares False too
    inv = torch.ones_like(safe_denom) / safe_denom  # one IEEE division per block; kernels do the same
    scaled = torch.where(denom > 0, blocks * inv, torch.zeros_like(blocks))
    return _encode_e2m1(scaled)


def _search_block_scales(
    blocks: torch.Tensor, amax_scales: torch.Tensor, ts_safe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, the e4m3 scale among ``SCALE_SEARCH_STEPS`` around the amax rule's that
    minimises the block's squared decoding error; returns ``(block_scales, codes)``."""
    base_bits = amax_scales.view(torch.uint8).to(torch.int16)
    nan_block = torch.isnan(amax_scales.to(torch.float32))
    best_scales = best_codes = best_err = None
    for step in SCALE_SEARCH_STEPS:
        # 0x7E is 448, the largest finite e4m3 (0x7F is NaN)
        scales = (base_bits + step).clamp_(0, 0x7E).to(torch.uint8).view(torch.float8_e4m3fn)
        scales = torch.where(nan_block, amax_scales, scales)
        codes = _encode_blocks(blocks, scales, ts_safe)
        decoded = _decode_e2m1(codes) * (scales.to(torch.float32) * ts_safe).unsqueeze(-1)
        err = (decoded - blocks).square().sum(dim=-1)
        if best_err is None:
            best_scales, best_codes, best_err = scales, codes, err
        else:
            better = err < best_err  # strict: ties keep the earlier (amax-rule-first) candidate
            best_err = torch.where(better, err, best_err)
            best_scales = torch.where(better, scales, best_scales)
            best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
    return best_scales, best_codes


def quantize_nvfp4(
    x: torch.Tensor, scale_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any float dtype, any strides) to NVFP4 along its last dimension.

    ``scale_search=False`` (activations, and what the kernels compute) takes each block scale
    from the block's amax. ``scale_search=True`` (weights, quantized once) then tries the e4m3
    scales a few steps around it (``SCALE_SEARCH_STEPS``) and keeps, per block, the one with
    the smallest squared error. Either way the result is ordinary NVFP4: decoding is unchanged.

    Returns ``(packed uint8 [..., Kp/2], block_scales float8_e4m3fn [..., Kp/16],
    tensor_scale fp32 scalar)``.
    """
    xf = pad_last(as_fp32(x), NVFP4_BLOCK)
    blocks = xf.reshape(*xf.shape[:-1], xf.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    absb = nan_free_abs(blocks)

    tensor_scale = div_exact(absb.amax(), F8_E4M3_MAX * F4_E2M1_MAX) if absb.numel() else absb.new_zeros(())
    ts_safe = torch.where(tensor_scale > 0, tensor_scale, torch.ones_like(tensor_scale))

    block_amax = absb.amax(dim=-1)
    scale_f32 = (div_exact(block_amax, F4_E2M1_MAX) / ts_safe).clamp_(max=F8_E4M3_MAX)
    block_has_nan = torch.isnan(blocks).any(dim=-1)
    scale_f32 = torch.where(block_has_nan, torch.full_like(scale_f32, float("nan")), scale_f32)
    block_scales = scale_f32.to(torch.float8_e4m3fn)

    if scale_search:
        block_scales, codes = _search_block_scales(blocks, block_scales, ts_safe)
    else:
        codes = _encode_blocks(blocks, block_scales, ts_safe)
    codes = codes.reshape(xf.shape)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), block_scales.contiguous(), tensor_scale.to(torch.float32)


def nvfp4_block_values(packed: torch.Tensor, block_scales: torch.Tensor) -> torch.Tensor:
    """``E2M1[code] · block_scale`` as fp32 (exact in bf16), *without* the tensor scale.

    This is the operand a Hopper kernel feeds to bf16 tensor cores; the tensor scales
    of both operands are applied once to the fp32 accumulator.
    """
    values = _decode_e2m1(_unpack(packed))
    blocks = values.reshape(*values.shape[:-1], values.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    return (blocks * block_scales.to(torch.float32).unsqueeze(-1)).reshape(values.shape)


def dequantize_nvfp4(
    packed: torch.Tensor,
    block_scales: torch.Tensor,
    tensor_scale: torch.Tensor,
    k: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode NVFP4 to ``dtype``; ``k`` trims the zero padding of the last dimension."""
    out = saturate_fp32(nvfp4_block_values(packed, block_scales) * tensor_scale.to(torch.float32))
    if k is not None:
        out = out[..., :k]
    return out.to(dtype)


def nvfp4_to_int8(
    packed: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel INT8 weights derived from stored NVFP4 weights (the INT8 route).

    sixbit keeps one stored weight copy, in NVFP4; INT8 GEMMs use this derivation. The
    padded K stays padded (the padding decodes to zeros).
    """
    return quantize_int8(dequantize_nvfp4(packed, block_scales, tensor_scale), axis=-1)


def nvfp4_to_fp8(
    packed: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel FP8 e4m3 weights derived from stored NVFP4 weights (the FP8 route).

    ``e2m1 · e4m3`` products are not always e4m3 values, so this rounds once more (per
    channel, like the INT8 route); the stored copy stays NVFP4.
    """
    return quantize_fp8_rows(dequantize_nvfp4(packed, block_scales, tensor_scale))
