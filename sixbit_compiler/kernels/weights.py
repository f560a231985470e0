"""Decode a stored NVFP4 weight into the operand a GEMM takes, once per call.

Resident weights stay NVFP4 (4.5 bits); the decoded operand lives for one linear call.
Decoding reads 0.56 B and writes 1 B (INT8) or 2 B (bf16) per weight: at the token counts
of video DiTs (tens of thousands) that is 1-2 % of the GEMM's time, measured in
docs/benchmarks.md, against +1 B per weight resident for a cached INT8 copy.

Spec: ``formats.nvfp4_to_int8`` (INT8 route), ``formats.nvfp4_to_fp8`` (FP8 route) and
``formats.nvfp4_block_values`` (values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import NO_FMA, e2m1_decode, e4m3_value, encode_rows, encode_rows_hw, is_nan, row_tiling, where_nan


@triton.jit
def _decode_chunk(packed_ptr, scales_ptr, rows, k0, N, KP, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """e2m1 * e4m3 values [BLOCK_N, BLOCK_K] of columns k0.. of the stored weight (0 past KP)."""
    half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    pmask = (rows[:, None] < N) & (half[None, :] < KP // 2)
    b = tl.load(packed_ptr + rows[:, None] * (KP // 2) + half[None, :], mask=pmask, other=0).to(tl.int32)
    codes = tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, BLOCK_K))  # element 2i is the low nibble
    blk = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    smask = (rows[:, None] < N) & (blk[None, :] < KP // 16)
    s = tl.load(scales_ptr + rows[:, None] * (KP // 16) + blk[None, :], mask=smask, other=0)
    s = e4m3_value(s)
    return tl.reshape(tl.reshape(e2m1_decode(codes), (BLOCK_N, BLOCK_K // 16, 16)) * s[:, :, None], (BLOCK_N, BLOCK_K))


@triton.jit
def _block_peaks(packed_ptr, scales_ptr, rows, k0, N, KP, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per 16-block of columns k0.. of the stored weight: the value of its largest-magnitude
    code times its scale, [BLOCK_N, BLOCK_K // 16] (0 past KP). An e2m1 magnitude grows with
    the code's low three bits, so the block's largest |value| is this one's magnitude: one decode
    per 16 weights instead of one per weight."""
    half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    pmask = (rows[:, None] < N) & (half[None, :] < KP // 2)
    b = tl.load(packed_ptr + rows[:, None] * (KP // 2) + half[None, :], mask=pmask, other=0).to(tl.int32)
    code = tl.max(tl.reshape(tl.maximum(b & 7, (b >> 4) & 7), (BLOCK_N, BLOCK_K // 16, 8)), axis=2)
    blk = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    smask = (rows[:, None] < N) & (blk[None, :] < KP // 16)
    s = tl.load(scales_ptr + rows[:, None] * (KP // 16) + blk[None, :], mask=smask, other=0)
    return e2m1_decode(code) * e4m3_value(s)


@triton.jit
def _row_max_step(w, amax, has_nan, lim):
    """(amax, has_nan) per row updated with the values w [R, C]: max |w| saturated at ``lim``
    with NaN as 0, and whether a NaN was seen (the two first-pass loops differ only in their w)."""
    isnan = is_nan(w)
    amax = tl.maximum(amax, tl.max(tl.where(isnan, 0.0, tl.minimum(tl.abs(w), lim)), axis=1))
    return amax, tl.maximum(has_nan, tl.max(isnan.to(tl.int32), axis=1))


@triton.jit
def _decode_kernel(
    packed_ptr, scales_ptr, ts_ptr, out_ptr, ch_scale_ptr, N, KP,
    TO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HW_CVT: tl.constexpr,
):
    """TO = 0: block values; 1 / 2: per-channel INT8 / FP8 e4m3 of the dequantized weight
    (``HW_CVT``: encoded with the GPU's conversion instructions, ``encode_rows_hw``).
    Rows go in chunks of BLOCK_K: for the per-channel codes a first pass takes the row's max
    from each 16-block's largest code (:func:`_block_peaks`), a second decodes (the packed row
    is small and in L2) and writes. (Decoding every weight in the first pass too made the decode
    0.9 ms of a W-14B block on an H100, about 5x its traffic's time.)"""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    lim = 3.4028234663852886e38
    if TO != 0:
        ts = tl.load(ts_ptr)
        amax = tl.zeros((BLOCK_N,), dtype=tl.float32)
        has_nan = tl.zeros((BLOCK_N,), dtype=tl.int32)
        if (ts == float("inf")) | (ts == float("-inf")):  # each zero code is then NaN (0 · inf): every weight
            for k0 in range(0, KP, BLOCK_K):
                w = _decode_chunk(packed_ptr, scales_ptr, rows, k0, N, KP, BLOCK_N, BLOCK_K) * ts
                amax, has_nan = _row_max_step(w, amax, has_nan, lim)
        else:  # the row's max from each block's largest code (the same fp32 products, rounded alike)
            for k0 in range(0, KP, BLOCK_K):
                w = _block_peaks(packed_ptr, scales_ptr, rows, k0, N, KP, BLOCK_N, BLOCK_K) * ts
                amax, has_nan = _row_max_step(w, amax, has_nan, lim)
        scale = tl.math.div_rn(amax, 127.0 if TO == 1 else 448.0)
        inv = tl.math.div_rn(1.0, tl.where(scale > 0, scale, 1.0))
        tl.store(ch_scale_ptr + rows, where_nan(has_nan > 0, scale), mask=rows < N)
    for k0 in range(0, KP, BLOCK_K):
        vals = _decode_chunk(packed_ptr, scales_ptr, rows, k0, N, KP, BLOCK_N, BLOCK_K)
        cols = k0 + tl.arange(0, BLOCK_K)
        omask = (rows[:, None] < N) & (cols[None, :] < KP)
        if TO != 0:
            w = vals * ts
            if HW_CVT:
                q = encode_rows_hw(w, inv, TO == 2)
            else:
                q = encode_rows(tl.minimum(tl.maximum(w, -lim), lim), inv, TO == 2)
            tl.store(out_ptr + rows[:, None] * KP + cols[None, :], q.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            tl.store(out_ptr + rows[:, None] * KP + cols[None, :], vals.to(out_ptr.dtype.element_ty), mask=omask)


def _launch(packed, block_scales_bits, tensor_scale, out, ch_scale, to):
    n, kp = packed.shape[0], packed.shape[1] * 2
    block_n, block_k, warps, _ = row_tiling(kp)
    _decode_kernel[(triton.cdiv(n, block_n),)](
        packed, block_scales_bits, tensor_scale, out, ch_scale, n, kp,
        TO=to, BLOCK_N=block_n, BLOCK_K=block_k, HW_CVT=not interpreting(), num_warps=warps, **NO_FMA,
    )


def decode_nvfp4_to_int8(packed, block_scales_bits, tensor_scale):
    """-> (int8 [N, Kp], per-channel scale fp32 [N, 1]); equals formats.nvfp4_to_int8."""
    n, kp = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((n, kp), dtype=torch.int8, device=packed.device)
    scale = torch.empty((n, 1), dtype=torch.float32, device=packed.device)
    _launch(packed, block_scales_bits, tensor_scale, out, scale, 1)
    return out, scale


def decode_nvfp4_to_fp8(packed, block_scales_bits, tensor_scale):
    """-> (float8_e4m3fn [N, Kp], per-channel scale fp32 [N, 1]); equals formats.nvfp4_to_fp8."""
    n, kp = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((n, kp), dtype=torch.uint8, device=packed.device)
    scale = torch.empty((n, 1), dtype=torch.float32, device=packed.device)
    _launch(packed, block_scales_bits, tensor_scale, out, scale, 2)
    return out.view(torch.float8_e4m3fn), scale


def decode_nvfp4_values(packed, block_scales_bits, dtype=torch.bfloat16):
    """-> e2m1 * e4m3 block values [N, Kp] (exact in bf16); equals formats.nvfp4_block_values."""
    n, kp = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((n, kp), dtype=dtype, device=packed.device)
    _launch(packed, block_scales_bits, packed, out, out, 0)  # ts / ch_scale unused
    return out
