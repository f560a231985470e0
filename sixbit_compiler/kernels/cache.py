"""Block-cache kernels: the temporal delta cache's bookkeeping in one read of each operand.

``delta_refresh(x, y, prev)``: for a computed block, Δ = Y − X (rounded to the activation
dtype, as the reference subtracts), stored per-token INT8 (``formats.quantize_int8``'s
numerics, via ``int8_rows``), plus per-row partial sums of |Δ|, |X| and, with a previous
entry, |Δ − Δ_prev| and |Δ_prev| (Δ_prev dequantized to the activation dtype, as the
reference's ``StoredDelta.load``). Γ and the residual change are ratios of the summed
partials. Reads X, Y (and the previous codes), writes the codes: about 6 bytes per element
where the eager sequence moved ~40.

``residual_abs_sums(y, x)``: [Σ|y − x|, Σ|x|] only (DMPQ's Γ without the block cache).

``apply_delta(x, codes, scales)``: a skipped block's output X + Δ in one pass.

Sums are deterministic: one partial per row (a fixed order inside the row), then one
``torch.sum`` over rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NO_FMA, int8_rows, is_nan, next_pow2


@triton.jit
def _to_act(v, ref):
    """fp32 v rounded to the dtype of ``ref`` (the activation), back in fp32. bf16 rounds on
    the bits (nearest, ties to even): the interpreter's bf16 cast truncates."""
    if ref.dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536).to(tl.float32, bitcast=True)
        # NaN passes unrounded: the GPU's canonical NaN (0x7FFFFFFF) would carry into the sign
        # bit and come out as -0 (seen on the H200)
        return tl.where(is_nan(v), v, rounded)
    else:
        return v.to(ref.dtype).to(tl.float32)


def _tiling(n: int) -> tuple[int, int, int]:
    block_n = next_pow2(n)
    block_m = max(1, min(16, 4096 // block_n))
    warps = 4 if block_n * block_m <= 4096 else 8
    return block_m, block_n, warps


@triton.jit
def _delta_kernel(
    x_ptr, y_ptr, pq_ptr, ps_ptr, q_ptr, s_ptr, part_ptr,
    M, N, stride_x, stride_y, stride_pq, stride_q, limit,
    QUANT: tl.constexpr, HAS_PREV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < N)
    xr = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    yr = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
    x = xr.to(tl.float32)
    d = _to_act(yr.to(tl.float32) - x, xr)  # Δ in the activation dtype
    tl.store(part_ptr + rows * 4 + 1, tl.sum(tl.abs(x), axis=1), mask=row_ok)
    if QUANT:
        dq = tl.where(d > limit, limit, tl.where(d < -limit, -limit, d))
        q, scale, amax, a = int8_rows(dq)
        tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], q.to(tl.int8), mask=mask)
        tl.store(s_ptr + rows, scale, mask=row_ok)
    tl.store(part_ptr + rows * 4, tl.sum(tl.abs(d), axis=1), mask=row_ok)
    if HAS_PREV:
        pq = tl.load(pq_ptr + rows[:, None] * stride_pq + cols[None, :], mask=mask, other=0).to(tl.float32)
        ps = tl.load(ps_ptr + rows, mask=row_ok, other=0.0)
        p = _to_act(pq * ps[:, None], xr)
        tl.store(part_ptr + rows * 4 + 2, tl.sum(tl.abs(d - p), axis=1), mask=row_ok)
        tl.store(part_ptr + rows * 4 + 3, tl.sum(tl.abs(p), axis=1), mask=row_ok)


@triton.jit
def _apply_kernel(x_ptr, q_ptr, s_ptr, out_ptr, M, N, stride_x, stride_q, stride_o,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < N)
    xr = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    q = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    d = _to_act(q * s[:, None], xr)
    out = _to_act(xr.to(tl.float32) + d, xr)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], out.to(xr.dtype), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def delta_refresh(x: torch.Tensor, y: torch.Tensor, prev: tuple[torch.Tensor, torch.Tensor] | None = None,
                  quantize: bool = True):
    """(codes int8 [..., N] or None, scales fp32 [..., 1] or None, sums fp32 [4]) for Δ = y − x.

    sums = [Σ|Δ|, Σ|x|, Σ|Δ − Δ_prev|, Σ|Δ_prev|] (the last two 0 without ``prev``).
    """
    shape = x.shape
    x2, y2 = _rows(x), _rows(y)
    m, n = x2.shape
    block_m, block_n, warps = _tiling(n)
    part = torch.zeros((m, 4), dtype=torch.float32, device=x.device)
    q = torch.empty((m, n), dtype=torch.int8, device=x.device) if quantize else part
    s = torch.empty((m,), dtype=torch.float32, device=x.device) if quantize else part
    pq, ps = (_rows(prev[0]), prev[1].reshape(-1)) if prev is not None else (part, part)
    _delta_kernel[(triton.cdiv(m, block_m),)](
        x2, y2, pq, ps, q, s, part, m, n, x2.stride(0), y2.stride(0), pq.stride(0) if prev is not None else 0,
        q.stride(0) if quantize else 0, torch.finfo(x.dtype).max,
        QUANT=quantize, HAS_PREV=prev is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, **NO_FMA,
    )
    sums = part.sum(dim=0)
    if not quantize:
        return None, None, sums
    return q.reshape(shape), s.reshape(*shape[:-1], 1), sums


def residual_abs_sums(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[Σ|y − x|, Σ|x|] in fp32 (Δ rounded to the activation dtype first)."""
    return delta_refresh(x, y, None, quantize=False)[2][:2]


def apply_delta(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x + dequantize_int8(codes, scales) in x's dtype."""
    x2, q2 = _rows(x), _rows(codes)
    m, n = x2.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m, block_n, warps = _tiling(n)
    _apply_kernel[(triton.cdiv(m, block_m),)](x2, q2, scales.reshape(-1), out, m, n, x2.stride(0), q2.stride(0),
                                              out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return out.reshape(x.shape)
