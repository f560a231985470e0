"""Activation quantization kernels (spec: sixbit_compiler.formats).

``quantize_int8_rows`` / ``quantize_fp8_rows``: per-token symmetric INT8 / FP8 e4m3 in one
HBM read of the activation, plus per-row max|x| and sum|x| (PDR's outlier ratio max|x| /
mean|x| comes from them at no extra read). Rows wider than 1024 go in chunks: a first pass
takes the row's max, a second (from L2) writes the codes.

``quantize_nvfp4_values``: NVFP4 fake-quantization for Hopper. NVFP4's per-tensor scale
needs the tensor's amax first, so this is a row-stats pass then a quantize pass (two reads;
the codegen issue fuses the first into the producer). It writes ``e2m1 * e4m3`` block values,
exact in bf16, which bf16 tensor cores multiply exactly; the tensor scale is applied in the
GEMM epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats._common import div_exact
from . import interpreting
from ._common import (MAX_CHUNK, NO_FMA, e2m1_round, encode_rows, encode_rows_hw, fp8_rows, gelu_tanh, int8_rows,
                      is_nan, round_to, round_to_e4m3, row_tiling, saturate, where_nan)
from .gemm import autotune_kwargs, single_config

_F4_MAX, _F8_MAX = 6.0, 448.0


@triton.jit
def _row_chunk(x_ptr, rows, row_ok, k0, K, stride_xm, EVICT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns k0 .. k0 + BLOCK_K of ``rows`` as fp32 (0 past K and for rows past the end), with
    their column indices and mask, loaded with the eviction policy ``EVICT``."""
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0, eviction_policy=EVICT)
    return x.to(tl.float32), cols, mask


#: GELU(0.5) ≈ 0.35 exceeds |GELU(x)| for every x < 0 (at most 0.17, near x = −0.75)
_GELU_DECIDES = tl.constexpr(0.5)


@triton.jit
def _gelu_rows_amax(x_ptr, rows, row_ok, K, stride_xm, limit, EVICT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_K: tl.constexpr, HW_CVT: tl.constexpr):
    """(max |GELU(x)| per row, rounded to x's dtype and saturated at ``limit``; 1 where GELU(x)
    has a NaN), evaluating GELU once per row where it can. GELU increases above its minimum
    (x ≈ −0.75) and |GELU(x)| < 0.17 for x < 0, so where a row's largest x is 0.5 or more its
    max |GELU| is GELU(max x): rounding to x's dtype is monotone, and between neighbouring
    bf16 / fp16 inputs GELU grows by far more than fp32's rounding error (an fp32 input could
    land an ulp off). Only rows whose largest value is smaller look at every GELU(x): a third
    pass, taken by a program only if one of its rows needs it. GELU(x) is NaN exactly where x
    is NaN or −inf (−inf · sigmoid(−inf) = −inf · 0)."""
    xmax = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    has_nan = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x, _, _ = _row_chunk(x_ptr, rows, row_ok, k0, K, stride_xm, EVICT, BLOCK_K)
        bad = is_nan(x) | (x == float("-inf"))
        xmax = tl.maximum(xmax, tl.max(tl.where(bad, float("-inf"), x), axis=1))
        has_nan = tl.maximum(has_nan, tl.max(bad.to(tl.int32), axis=1))
    amax = tl.minimum(round_to(gelu_tanh(xmax), x_ptr.dtype.element_ty, HW_CVT), limit)
    small = row_ok & (xmax < _GELU_DECIDES)
    if tl.max(small.to(tl.int32), axis=0) > 0:
        every = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x, _, _ = _row_chunk(x_ptr, rows, row_ok, k0, K, stride_xm, EVICT, BLOCK_K)
            y = round_to(gelu_tanh(x), x_ptr.dtype.element_ty, HW_CVT)
            every = tl.maximum(every, tl.max(tl.where(is_nan(y), 0.0, tl.minimum(tl.abs(y), limit)), axis=1))
        amax = tl.where(small, every, amax)
    return amax, has_nan


@triton.jit
def _rows_kernel(
    x_ptr, q_ptr, scale_ptr, amax_ptr, abssum_ptr,
    M, K, stride_xm, stride_qm, limit,
    FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr,
    HW_CVT: tl.constexpr, L2_HINTS: tl.constexpr = False, GELU: tl.constexpr = False,
):
    """Per-row INT8 (codes as int8) or FP8 e4m3 (codes as uint8 bits), scale = amax / qmax.
    ``HW_CVT``: encode with the GPU's conversion instructions (``encode_rows_hw``).
    ``GELU``: quantize GELU(x) (tanh approximation), rounded to x's dtype as a GELU kernel
    writing it would round it. The chunked path finds each row's max |GELU(x)| from its largest
    x (:func:`_gelu_rows_amax`) and computes GELU once per value, in the pass that writes the
    codes: two evaluations per value (one per pass) took the W-14B feed-forward's quantization
    from 0.5 to 1.2 ms on an H100, more than the separate GELU kernel it replaced.
    ``L2_HINTS``: the first pass's loads ask L2 to keep the lines (the second pass re-reads
    them), the second pass's loads and the code stores to drop them first."""
    FIRST: tl.constexpr = "evict_last" if L2_HINTS else ""
    AFTER: tl.constexpr = "evict_first" if L2_HINTS else ""
    QMAX: tl.constexpr = 448.0 if FP8 else 127.0
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    if ONE_CHUNK:  # the whole row in one tile: one load, kept in registers
        cols = tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if GELU:
            x = round_to(gelu_tanh(x), x_ptr.dtype.element_ty, HW_CVT)
        x = saturate(x, limit)
        if FP8:
            q, scale, amax, a = fp8_rows(x)
        else:
            q, scale, amax, a = int8_rows(x)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        abssum = tl.sum(a, axis=1)
    else:
        # Pass 1 over the row's chunks: max|x|, sum|x|, NaN. Pass 2 re-reads the chunks (from
        # L2: a program's rows are a few tens of KB) and writes the codes. HBM sees one read.
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        abssum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        has_nan = tl.zeros((BLOCK_M,), dtype=tl.int32)
        if GELU:  # (sum |GELU(x)| is not computed: the INT8 GEMM, its only reader, discards it)
            amax, has_nan = _gelu_rows_amax(x_ptr, rows, row_ok, K, stride_xm, limit, FIRST, BLOCK_M, BLOCK_K,
                                            HW_CVT)
        else:
            for k0 in range(0, K, BLOCK_K):
                x, _, _ = _row_chunk(x_ptr, rows, row_ok, k0, K, stride_xm, FIRST, BLOCK_K)
                isnan = is_nan(x)
                a = tl.where(isnan, 0.0, tl.minimum(tl.abs(x), limit))
                amax = tl.maximum(amax, tl.max(a, axis=1))
                abssum += tl.sum(a, axis=1)
                has_nan = tl.maximum(has_nan, tl.max(isnan.to(tl.int32), axis=1))
        scale = tl.math.div_rn(amax, QMAX)
        inv = tl.math.div_rn(1.0, tl.where(scale > 0, scale, 1.0))
        for k0 in range(0, K, BLOCK_K):
            x, cols, mask = _row_chunk(x_ptr, rows, row_ok, k0, K, stride_xm, AFTER, BLOCK_K)
            if GELU:
                x = round_to(gelu_tanh(x), x_ptr.dtype.element_ty, HW_CVT)
            if HW_CVT:  # the conversions saturate ±Inf themselves
                q = encode_rows_hw(x, inv, FP8)
            else:
                x = saturate(x, limit)
                q = encode_rows(x, inv, FP8)
            tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask,
                     eviction_policy=AFTER)
        scale = where_nan(has_nan > 0, scale)
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    tl.store(amax_ptr + rows, amax, mask=row_ok)
    tl.store(abssum_ptr + rows, abssum, mask=row_ok)


#: Tilings of rows wider than MAX_CHUNK, (rows per program, chunk width, warps), autotuned per K.
#: On the H100 (INT8, ``benchmarks/kernels.py --quant-sweep``, GB/s of minimum traffic against
#: a 3,020 GB/s copy) the best was (8, 512, 8) at K = 1536 (2,390), (2, 2048, 8) at 8960 (2,330),
#: (1, 2048, 4) at 5120 (2,430) and (1, 2048, 8) at 13824 (2,130). The first entry, the choice
#: without autotuning, was within 5 % of the best at every K above 2048. Short rows want many
#: rows per program, long ones wide chunks and few rows: the second pass re-reads a program's
#: rows from L2, so its footprint must stay small (the old rule, up to 16 rows of 256-1024
#: chunks, ran 1,490-1,880 GB/s). Whole rows held in registers (padded to a power of two)
#: reached only 900-1,460 GB/s.
ROW_TILINGS = ((2, 2048, 8), (8, 512, 8), (4, 512, 4), (1, 2048, 8), (1, 2048, 4))

#: Each tiling runs with and without L2 eviction hints (``L2_HINTS``: keep the first pass's
#: lines for the second, drop them and the codes after). On the H100 (``--quant-sweep hints``)
#: the hints lifted K = 8960 from 2,325 to 2,517 GB/s and K = 13824 from 2,133 to 2,527 (the
#: long rows had fallen out of L2 between the passes), K = 1536 from 2,386 to 2,427-2,451, and
#: cost about 1 % at K = 5120. Without autotuning they are on.
HINTS = (True, False)


def _prune_row_tilings(configs, named_args, **kwargs):
    """Chunks narrower than the row (a wider one would be the row padded: the one-chunk path)."""
    return [c for c in configs if c.kwargs["BLOCK_K"] < named_args["K"]] or configs[-1:]


_rows_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "L2_HINTS": hints}, num_warps=w)
             for bm, bk, w in ROW_TILINGS for hints in HINTS],
    key=["K", "FP8", "GELU"],
    **{**autotune_kwargs(), "prune_configs_by": {"early_config_prune": _prune_row_tilings}},
)(_rows_kernel)


def _untuned_row_tiling(k: int) -> tuple[int, int, int, bool]:
    """The tiling without autotuning (interpreter, SIXBIT_GEMM_AUTOTUNE=0): a row up to
    MAX_CHUNK in one tile, a wider one by the first of ROW_TILINGS with a narrower chunk."""
    if k <= MAX_CHUNK:
        return row_tiling(k)
    block_m, block_k, warps = next((t for t in ROW_TILINGS if t[1] < k), ROW_TILINGS[-1])
    return block_m, block_k, warps, False


def _quantize_rows(x: torch.Tensor, fp8: bool, codes: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                   gelu: bool = False):
    assert x.dim() == 2 and x.stride(1) == 1
    m, k = x.shape
    q = codes if codes is not None else torch.empty((m, k), dtype=torch.uint8 if fp8 else torch.int8, device=x.device)
    scale = scales if scales is not None else torch.empty((m, 1), dtype=torch.float32, device=x.device)
    assert q.shape == (m, k) and q.stride(1) == 1 and scale.shape == (m, 1) and scale.is_contiguous()
    amax = torch.empty((m,), dtype=torch.float32, device=x.device)
    abssum = torch.empty((m,), dtype=torch.float32, device=x.device)
    args = (x, q, scale, amax, abssum, m, k, x.stride(0), q.stride(0), torch.finfo(x.dtype).max)
    flags = dict(FP8=fp8, HW_CVT=not interpreting(), GELU=gelu, **NO_FMA)
    if k > MAX_CHUNK and not single_config():
        _rows_autotuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](*args, ONE_CHUNK=False, **flags)
    else:
        block_m, block_k, warps, one = _untuned_row_tiling(k)
        _rows_kernel[(triton.cdiv(m, block_m),)](*args, BLOCK_M=block_m, BLOCK_K=block_k, ONE_CHUNK=one,
                                                 L2_HINTS=HINTS[0], num_warps=warps, **flags)
    return (q.view(torch.float8_e4m3fn) if fp8 else q), scale, amax, abssum


def quantize_int8_rows(x: torch.Tensor, codes: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                       gelu: bool = False):
    """x [M, K] (bf16/fp16/fp32) -> (codes int8 [M, K], scale fp32 [M, 1], row amax [M], row sum|x| [M]).
    ``codes`` / ``scales``: write into these (int8 [M, K] with unit column stride, fp32 [M, 1]).
    ``gelu``: of ``F.gelu(x, approximate="tanh")`` in x's dtype instead; the row stats are then
    GELU(x)'s max|·|, and the sum is zeros for rows wider than 1024 (not computed)."""
    return _quantize_rows(x, False, codes, scales, gelu)


def quantize_rows_into(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, fp8: bool) -> None:
    """Per-token INT8 codes (``codes`` int8) or FP8 e4m3 codes (``codes`` uint8 bits) of x [M, K]
    and their fp32 scales, written into ``codes`` [M, K] (unit column stride) and ``scales`` [M, 1]."""
    assert codes.dtype == (torch.uint8 if fp8 else torch.int8)
    _quantize_rows(x, fp8, codes, scales)


def quantize_fp8_rows(x: torch.Tensor, gelu: bool = False):
    """x [M, K] -> (float8_e4m3fn codes [M, K], scale fp32 [M, 1], row amax, row sum|x|); the
    codes and scale equal ``formats.quantize_fp8_rows`` bit for bit. ``gelu``: as in
    :func:`quantize_int8_rows`."""
    return _quantize_rows(x, True, gelu=gelu)


@triton.jit
def _row_stats_kernel(x_ptr, amax_ptr, abssum_ptr, M, K, stride_xm, limit, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    abssum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a = tl.abs(x)
        a = tl.where(is_nan(a), 0.0, tl.minimum(a, limit))
        amax = tl.maximum(amax, tl.max(a, axis=1))
        abssum += tl.sum(a, axis=1)
    tl.store(amax_ptr + rows, amax, mask=rows < M)
    tl.store(abssum_ptr + rows, abssum, mask=rows < M)


@triton.jit
def _nvfp4_values_kernel(
    x_ptr, out_ptr, ts_ptr, M, K, stride_xm, stride_om, limit,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # every 16-element block is independent given the tensor scale: a 2-D grid of row x chunk tiles
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = saturate(x, limit)
    ts = tl.load(ts_ptr)
    ts_safe = tl.where(ts > 0, ts, 1.0)
    xb = tl.reshape(x, (BLOCK_M, BLOCK_K // 16, 16))
    isnan = is_nan(xb)
    amax = tl.max(tl.where(isnan, 0.0, tl.abs(xb)), axis=2)
    has_nan = tl.max(isnan.to(tl.int32), axis=2) > 0
    bs = round_to_e4m3(tl.minimum(tl.math.div_rn(tl.math.div_rn(amax, 6.0), ts_safe), 448.0))
    denom = bs * ts_safe
    safe = tl.where(denom > 0, denom, 1.0)
    inv = tl.math.div_rn(1.0, safe)
    scaled = tl.where(denom[:, :, None] > 0, xb * inv[:, :, None], 0.0)
    scaled = tl.where(isnan, 0.0, scaled)
    mag = e2m1_round(tl.abs(scaled))
    val = tl.where(scaled < 0, -mag, mag) * bs[:, :, None]
    val = where_nan(has_nan[:, :, None], val)
    val = tl.reshape(val, (BLOCK_M, BLOCK_K))
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)


def row_stats(x: torch.Tensor):
    """Per-row NaN-free max|x| and sum|x| (±Inf saturated) of x [M, K]."""
    m, k = x.shape
    amax = torch.empty((m,), dtype=torch.float32, device=x.device)
    abssum = torch.empty((m,), dtype=torch.float32, device=x.device)
    block_m, block_k, warps, _ = row_tiling(k)
    _row_stats_kernel[(triton.cdiv(m, block_m),)](
        x, amax, abssum, m, k, x.stride(0), torch.finfo(x.dtype).max, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps
    )
    return amax, abssum


def quantize_nvfp4_values(x: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16):
    """x [M, K], K % 16 == 0 -> (block values [M, K] in out_dtype, tensor scale fp32 0-d, row amax, row sum|x|).

    ``values * tensor_scale == dequantize_nvfp4(*quantize_nvfp4(x))`` exactly.
    """
    assert x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 16 == 0
    m, k = x.shape
    amax, abssum = row_stats(x)
    ts = div_exact(amax.max() if m else amax.new_zeros(()), _F8_MAX * _F4_MAX)
    out = torch.empty((m, k), dtype=out_dtype, device=x.device)
    block_m, block_k, warps, _ = row_tiling(k)
    _nvfp4_values_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, block_k))](
        x, out, ts, m, k, x.stride(0), out.stride(0), torch.finfo(x.dtype).max,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, **NO_FMA,
    )
    return out, ts, amax, abssum
