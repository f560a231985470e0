"""Activation quantization kernels (spec: sixbit_compiler.formats).

``quantize_int8_rows``: per-token symmetric INT8 in one read of the activation, plus per-row
max|x| and sum|x| (PDR's outlier ratio max|x| / mean|x| comes from them at no extra read).

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
from ._common import NO_FMA, e2m1_round, int8_rows, is_nan, next_pow2, round_to_e4m3, where_nan

_F4_MAX, _F8_MAX = 6.0, 448.0


@triton.jit
def _int8_rows_kernel(
    x_ptr, q_ptr, scale_ptr, amax_ptr, abssum_ptr,
    M, K, stride_xm, stride_qm, limit,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.where(x > limit, limit, tl.where(x < -limit, -limit, x))  # ±Inf saturates; NaN passes
    q, scale, amax, a = int8_rows(x)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q.to(tl.int8), mask=mask)
    row_ok = rows < M
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    tl.store(amax_ptr + rows, amax, mask=row_ok)
    tl.store(abssum_ptr + rows, tl.sum(a, axis=1), mask=row_ok)


def _row_tiling(k: int) -> tuple[int, int, int]:
    block_k = next_pow2(k)
    block_m = max(1, min(64, 4096 // block_k))
    warps = 4 if block_k * block_m <= 4096 else 8
    return block_m, block_k, warps


def quantize_int8_rows(x: torch.Tensor):
    """x [M, K] (bf16/fp16/fp32) -> (codes int8 [M, K], scale fp32 [M, 1], row amax [M], row sum|x| [M])."""
    assert x.dim() == 2 and x.stride(1) == 1
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    amax = torch.empty((m,), dtype=torch.float32, device=x.device)
    abssum = torch.empty((m,), dtype=torch.float32, device=x.device)
    block_m, block_k, warps = _row_tiling(k)
    _int8_rows_kernel[(triton.cdiv(m, block_m),)](
        x, q, scale, amax, abssum, m, k, x.stride(0), q.stride(0), torch.finfo(x.dtype).max,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, **NO_FMA,
    )
    return q, scale, amax, abssum


@triton.jit
def _row_stats_kernel(x_ptr, amax_ptr, abssum_ptr, M, K, stride_xm, limit, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(x)
    a = tl.where(is_nan(a), 0.0, tl.minimum(a, limit))
    tl.store(amax_ptr + rows, tl.max(a, axis=1), mask=rows < M)
    tl.store(abssum_ptr + rows, tl.sum(a, axis=1), mask=rows < M)


@triton.jit
def _nvfp4_values_kernel(
    x_ptr, out_ptr, ts_ptr, M, K, stride_xm, stride_om, limit,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.where(x > limit, limit, tl.where(x < -limit, -limit, x))
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
    block_m, block_k, warps = _row_tiling(k)
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
    block_m, block_k, warps = _row_tiling(k)
    _nvfp4_values_kernel[(triton.cdiv(m, block_m),)](
        x, out, ts, m, k, x.stride(0), out.stride(0), torch.finfo(x.dtype).max,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, **NO_FMA,
    )
    return out, ts, amax, abssum
