"""Decode a stored NVFP4 weight into the operand a GEMM takes, once per call.

Resident weights stay NVFP4 (4.5 bits); the decoded operand lives for one linear call.
Decoding reads 0.56 B and writes 1 B (INT8) or 2 B (bf16) per weight: at the token counts
of video DiTs (tens of thousands) that is 1-2 % of the GEMM's time, measured in
docs/benchmarks.md, against +1 B per weight resident for a cached INT8 copy.

Two kernels, each with parallelism to fill the GPU:

* ``_channel_scale_kernel`` (INT8 / FP8 only): one program per few rows walks the packed row
  once and writes the per-channel scale and its reciprocal (the codes need the row's max
  first). It reads 0.56 B per weight.
* ``_decode_tiles_kernel``: a 2-D grid of (rows × bytes) tiles, each decoding its bytes and
  writing the operand. The two codes of a byte (elements 2i and 2i+1) are decoded as two
  separate tiles and their outputs packed into one 16-bit (INT8 / FP8) or 32-bit (bf16 /
  fp16) store, so no tile ever interleaves registers.

Until 2026-11 one kernel did both, a program per row block decoding every row twice: on the
H100 it ran 570-620 GB/s (69 µs for a 5120² weight against a 14 µs floor).

Spec: ``formats.nvfp4_to_int8`` (INT8 route), ``formats.nvfp4_to_fp8`` (FP8 route) and
``formats.nvfp4_block_values`` (values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import NO_FMA, e2m1_decode, e4m3_value, encode_rows, encode_rows_hw, is_nan, next_pow2, where_nan

_LIMIT = 3.4028234663852886e38  # fp32 max: the decoded weight saturates there, as in the spec


@triton.jit
def _byte_values(packed_ptr, scales_ptr, rows, h0, N, HALF_K, BLOCK_N: tl.constexpr, BYTES: tl.constexpr):
    """Values (e2m1 * e4m3) of the low and high codes of bytes h0 .. h0 + BYTES of ``rows``:
    two fp32 [BLOCK_N, BYTES] tiles, elements 2i and 2i + 1 of the weight (0 past the edges),
    and the in-bounds mask. ``h0`` and ``BYTES`` are multiples of 8 (a block of 16 codes)."""
    cols = h0 + tl.arange(0, BYTES)
    mask = (rows[:, None] < N) & (cols[None, :] < HALF_K)
    b = tl.load(packed_ptr + rows[:, None] * HALF_K + cols[None, :], mask=mask, other=0).to(tl.int32)
    blk = h0 // 8 + tl.arange(0, BYTES // 8)
    smask = (rows[:, None] < N) & (blk[None, :] < HALF_K // 8)
    s = tl.load(scales_ptr + rows[:, None] * (HALF_K // 8) + blk[None, :], mask=smask, other=0)
    s = e4m3_value(s)[:, :, None]
    lo = tl.reshape(tl.reshape(e2m1_decode(b & 15), (BLOCK_N, BYTES // 8, 8)) * s, (BLOCK_N, BYTES))
    hi = tl.reshape(tl.reshape(e2m1_decode(b >> 4), (BLOCK_N, BYTES // 8, 8)) * s, (BLOCK_N, BYTES))
    return lo, hi, mask


@triton.jit
def _channel_scale_kernel(
    packed_ptr, scales_ptr, ts_ptr, ch_scale_ptr, inv_ptr, N, HALF_K, QMAX: tl.constexpr,
    BLOCK_N: tl.constexpr, BYTES: tl.constexpr,
):
    """Per row: scale = max|w| / QMAX (NaN if the row holds NaN) and 1 / scale (1 for a zero row)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ts = tl.load(ts_ptr)
    amax = tl.zeros((BLOCK_N,), dtype=tl.float32)
    has_nan = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for h0 in range(0, HALF_K, BYTES):
        lo, hi, mask = _byte_values(packed_ptr, scales_ptr, rows, h0, N, HALF_K, BLOCK_N, BYTES)
        lo = tl.where(mask, lo * ts, 0.0)
        hi = tl.where(mask, hi * ts, 0.0)
        nan_lo, nan_hi = is_nan(lo), is_nan(hi)
        a = tl.maximum(tl.where(nan_lo, 0.0, tl.minimum(tl.abs(lo), _LIMIT)),
                       tl.where(nan_hi, 0.0, tl.minimum(tl.abs(hi), _LIMIT)))
        amax = tl.maximum(amax, tl.max(a, axis=1))
        has_nan = tl.maximum(has_nan, tl.max((nan_lo | nan_hi).to(tl.int32), axis=1))
    scale = tl.math.div_rn(amax, QMAX)
    inv = tl.math.div_rn(1.0, tl.where(scale > 0, scale, 1.0))
    tl.store(ch_scale_ptr + rows, where_nan(has_nan > 0, scale), mask=rows < N)
    tl.store(inv_ptr + rows, inv, mask=rows < N)


@triton.jit
def _decode_tiles_kernel(
    packed_ptr, scales_ptr, ts_ptr, inv_ptr, out_ptr, N, HALF_K,
    TO: tl.constexpr, VALUES: tl.constexpr, BLOCK_N: tl.constexpr, BYTES: tl.constexpr, HW_CVT: tl.constexpr,
):
    """TO = 0: block values, in fp32 / bf16 / fp16 (VALUES = 0 / 1 / 2); TO = 1 / 2: per-channel
    INT8 / FP8 e4m3 codes (``HW_CVT``: encoded with the GPU's conversion instructions).
    ``out_ptr`` holds one element pair per stored byte: int16 (two one-byte codes) or int32 (two
    16-bit values), the low half being element 2i; for fp32 values it is the [N, K] output itself."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    h0 = tl.program_id(1) * BYTES
    lo, hi, mask = _byte_values(packed_ptr, scales_ptr, rows, h0, N, HALF_K, BLOCK_N, BYTES)
    pairs = rows[:, None] * HALF_K + h0 + tl.arange(0, BYTES)[None, :]
    if TO != 0:
        ts = tl.load(ts_ptr)
        inv = tl.load(inv_ptr + rows, mask=rows < N, other=1.0)
        lo = lo * ts
        hi = hi * ts
        if HW_CVT:
            q_lo, q_hi = encode_rows_hw(lo, inv, TO == 2), encode_rows_hw(hi, inv, TO == 2)
        else:
            q_lo = encode_rows(tl.minimum(tl.maximum(lo, -_LIMIT), _LIMIT), inv, TO == 2).to(tl.int32)
            q_hi = encode_rows(tl.minimum(tl.maximum(hi, -_LIMIT), _LIMIT), inv, TO == 2).to(tl.int32)
        pair = (q_lo & 0xFF) | ((q_hi & 0xFF) << 8)
        tl.store(out_ptr + pairs, pair.to(tl.int16), mask=mask)
    elif VALUES == 0:
        tl.store(out_ptr + 2 * pairs, lo, mask=mask)
        tl.store(out_ptr + 2 * pairs + 1, hi, mask=mask)
    else:
        # bf16 / fp16 (the values are exact in both): the 16 bits of each, paired in an int32
        half_ty = tl.bfloat16 if VALUES == 1 else tl.float16
        b_lo = lo.to(half_ty).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        b_hi = hi.to(half_ty).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        tl.store(out_ptr + pairs, b_lo | (b_hi << 16), mask=mask)


def _tiles(half_k: int) -> tuple[int, int]:
    """(rows, bytes) of a decode tile: 256 bytes wide (fewer for narrow weights), 4 KB of packed bytes."""
    nbytes = max(8, min(256, next_pow2(half_k)))
    return max(1, 4096 // nbytes), nbytes


_VALUE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _decode(packed, block_scales_bits, tensor_scale, out, ch_scale, to: int, qmax: float = 1.0):
    """Launch the two kernels (the first only for codes); returns ``out``."""
    n, half_k = packed.shape
    hw = not interpreting()
    inv = torch.empty((n,), dtype=torch.float32, device=packed.device)
    if to != 0:
        block_n, nbytes = 4, min(512, max(8, next_pow2(half_k)))
        _channel_scale_kernel[(triton.cdiv(n, block_n),)](
            packed, block_scales_bits, tensor_scale, ch_scale, inv, n, half_k, QMAX=qmax,
            BLOCK_N=block_n, BYTES=nbytes, num_warps=4, **NO_FMA,
        )
    pairs = out if out.dtype == torch.float32 else out.view(torch.int16 if out.element_size() == 1 else torch.int32)
    block_n, nbytes = _tiles(half_k)
    _decode_tiles_kernel[(triton.cdiv(n, block_n), triton.cdiv(half_k, nbytes))](
        packed, block_scales_bits, tensor_scale, inv, pairs, n, half_k,
        TO=to, VALUES=_VALUE_KINDS.get(out.dtype, 0), BLOCK_N=block_n, BYTES=nbytes, HW_CVT=hw, num_warps=4, **NO_FMA,
    )
    return out


def decode_nvfp4_to_int8(packed, block_scales_bits, tensor_scale):
    """-> (int8 [N, Kp], per-channel scale fp32 [N, 1]); equals formats.nvfp4_to_int8."""
    n, kp = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((n, kp), dtype=torch.int8, device=packed.device)
    scale = torch.empty((n, 1), dtype=torch.float32, device=packed.device)
    _decode(packed, block_scales_bits, tensor_scale, out, scale, 1, 127.0)
    return out, scale


def decode_nvfp4_to_fp8(packed, block_scales_bits, tensor_scale):
    """-> (float8_e4m3fn [N, Kp], per-channel scale fp32 [N, 1]); equals formats.nvfp4_to_fp8."""
    n, kp = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((n, kp), dtype=torch.uint8, device=packed.device)
    scale = torch.empty((n, 1), dtype=torch.float32, device=packed.device)
    _decode(packed, block_scales_bits, tensor_scale, out, scale, 2, 448.0)
    return out.view(torch.float8_e4m3fn), scale


def decode_nvfp4_values(packed, block_scales_bits, dtype=torch.bfloat16):
    """-> e2m1 * e4m3 block values [N, Kp] (exact in bf16); equals formats.nvfp4_block_values."""
    n, kp = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((n, kp), dtype=dtype, device=packed.device)
    return _decode(packed, block_scales_bits, packed, out, out, 0)  # no tensor scale, no channel scale
