"""Wan's q / k RMS norm and RoPE, folded into the attention's Q / K quantization.

Spec: ``formats.attention.rms_norm_rope`` followed by ``quantize_queries`` / ``quantize_keys``
(op ``sixbit::quantized_attention_qk_norm_rope``, pass ``fold_qk_norm_rope``).

Unfolded, the projection's output x [B, S, H·D] makes three trips before the attention reads
it: Inductor's norm + RoPE kernel reads x and writes a rotated bf16 copy, K's token mean reads
that copy, and ``attention.quantize_qk`` reads it again to write the INT8 codes (1.2 + 0.13 +
0.47 ms of a W-14B block on an H100, docs/benchmarks.md block run 9). Folded:

* ``_rstd_kernel`` reads x once for each token's 1 / RMS over its whole width (the norm spans
  every head);
* ``_rope_rows_kernel``, one program per (tile of tokens, head) as ``attention.quantize_qk``'s,
  reads the head's slice of x, norms it with that rstd and the weight, rotates it and writes its
  INT8 codes (MODE 1); for K a first launch (MODE 0) writes per-tile sums of the normed,
  rotated keys, which the host adds into the token mean the codes subtract.

Q: two reads of x, K: three, and no bf16 copy. A first design did all of it in one program per
token tile, looping over the heads twice (the loads of the first loop kept in L2 for the
second): 0.7-1.5 ms per launch at W-14B, 5-13x its floor: at 200-250 registers per thread two
programs fit an SM, each with one small load in flight per loop step. One-shot [tokens, D]
tiles, as here, keep many loads in flight.

Rounding follows the eager chain: the norm (x · rstd · weight in fp32) is rounded to x's
dtype, the rotation computes in fp32 (Wan's frequencies are fp32) without fused multiply-adds
and is rounded to x's dtype again (``round_to``: the GPU's conversions, by hand under the
interpreter, whose bf16 cast truncates); the codes are then those of ``attention.quantize_qk`` on that tensor. The kernels'
rstd (a correctly rounded division and square root) and their sums of squares and of the mean
run in another order than PyTorch's; in bf16 and fp16 the norm's rounding absorbs that, in
fp32 a code may move by one where a value sits on a rounding boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import NO_FMA, int8_rows, round_to, row_tiling, saturate
from .attention import TOKEN_PAD, attend, quantize_v
from .gemm import autotune_kwargs, single_config

#: (tokens per program, warps) of ``_rope_rows_kernel``, autotuned; the first without autotuning
#: (64 tokens and 4 warps: ``attention.quantize_qk``'s tile, which streams at ~2.2 TB/s)
TILES = ((64, 4), (32, 4), (64, 8))


@triton.jit
def _rstd_kernel(x_ptr, rstd_ptr, R, S, WIDTH, eps, stride_b, stride_s, stride_c,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x²) + eps) over each token's whole width: fp32 [B·S] (R = B·S rows)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    base = (rows // S).to(tl.int64) * stride_b + (rows % S).to(tl.int64) * stride_s
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, WIDTH, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < R) & (cols[None, :] < WIDTH)
        x = tl.load(x_ptr + base[:, None] + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
        squares += tl.sum(x * x, axis=1)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(squares, WIDTH.to(tl.float32)) + eps))
    tl.store(rstd_ptr + rows, rstd, mask=rows < R)


@triton.jit
def _rope_rows_kernel(
    x_ptr, rstd_ptr, w_ptr, cos_ptr, sin_ptr, mean_ptr, out_ptr, scale_ptr,
    H, S, S_PAD, PARTIALS, limit, stride_b, stride_s, stride_c, cos_b, cos_s, cos_h, sin_b, sin_s, sin_h,
    MODE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_MEAN: tl.constexpr, HEAD_DIM: tl.constexpr,
    HW_CVT: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Head h of BLOCK_S tokens, normed (x · rstd · weight) and rotated. MODE 0: the sum over
    those tokens -> partial [B, PARTIALS, H, D]. MODE 1: per-token INT8 codes [B·H, S_PAD, D]
    and scales [B·H, S_PAD] (minus mean [B, H, D] if HAS_MEAN), zero past S. ``cos`` / ``sin``
    are [.., S, .., D/2] with unit stride over D/2."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = s < S
    d = tl.arange(0, HEAD_DIM)
    x = tl.load(x_ptr + b.to(tl.int64) * stride_b + s[:, None].to(tl.int64) * stride_s
                + (h * HEAD_DIM + d)[None, :] * stride_c, mask=ok[:, None], other=0.0)
    n = x.to(tl.float32) * tl.load(rstd_ptr + b * S + s, mask=ok, other=0.0)[:, None]
    if HAS_WEIGHT:
        n = n * tl.load(w_ptr + h * HEAD_DIM + d).to(tl.float32)[None, :]
    n = round_to(n, x.dtype, HW_CVT)  # rms_norm's output, in x's dtype
    x1, x2 = tl.split(tl.reshape(n, (BLOCK_S, HEAD_DIM // 2, 2)))  # the interleaved pairs
    j = tl.arange(0, HEAD_DIM // 2)
    cos = tl.load(cos_ptr + b * cos_b + s[:, None] * cos_s + h * cos_h + j[None, :], mask=ok[:, None], other=0.0)
    sin = tl.load(sin_ptr + b * sin_b + s[:, None] * sin_s + h * sin_h + j[None, :], mask=ok[:, None], other=0.0)
    r = tl.reshape(tl.join(round_to(x1 * cos - x2 * sin, x.dtype, HW_CVT),
                           round_to(x1 * sin + x2 * cos, x.dtype, HW_CVT)),
                   (BLOCK_S, HEAD_DIM))
    if MODE == 0:
        tl.store(out_ptr + ((b * PARTIALS + tile) * H + h).to(tl.int64) * HEAD_DIM + d, tl.sum(r, axis=0))
    else:
        if HAS_MEAN:
            r = tl.where(ok[:, None], r - tl.load(mean_ptr + bh * HEAD_DIM + d)[None, :], 0.0)
        q, scale, _, _ = int8_rows(saturate(r, limit), HW_CVT)
        row = bh.to(tl.int64) * S_PAD + s
        tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], q.to(tl.int8))
        tl.store(scale_ptr + row, scale)


_rope_rows_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_S": bs}, num_warps=w) for bs, w in TILES],
    key=["H", "HEAD_DIM", "MODE", "HAS_MEAN"],
    **{**autotune_kwargs(), "prune_configs_by": None},  # (no TMA configs to prune)
)(_rope_rows_kernel)


def unsupported_reason(x: torch.Tensor, weight, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> str | None:
    """Why the kernels cannot take this prologue, or None (the attention's own limits are
    ``attention.unsupported_reason``'s)."""
    if x.dim() != 3 or x.shape[-1] % heads:
        return f"x of shape {tuple(x.shape)} for {heads} heads"
    half = x.shape[-1] // heads // 2
    for name, f in (("cos", cos), ("sin", sin)):
        if f.dtype != torch.float32:
            return f"{name} in {f.dtype} (the kernel rotates with fp32 frequencies)"
        try:
            f.expand(x.shape[0], x.shape[1], heads, half)
        except RuntimeError:
            return f"{name} of shape {tuple(f.shape)} (not broadcastable to [B, S, H, D/2])"
    if weight is not None and (weight.shape != (x.shape[-1],) or weight.dtype != x.dtype):
        return f"norm weight {weight.dtype} {tuple(weight.shape)}"
    return None


def _eps(eps: float | None) -> float:
    # torch.rms_norm's default for bf16 / fp16 / fp32 inputs: fp32's epsilon (its compute type)
    return torch.finfo(torch.float32).eps if eps is None else float(eps)


def _rstd(x: torch.Tensor, eps: float | None) -> torch.Tensor:
    b, s, width = x.shape
    rstd = torch.empty((b * s,), dtype=torch.float32, device=x.device)
    block_m, block_k, warps, _ = row_tiling(width)
    _rstd_kernel[(triton.cdiv(b * s, block_m),)](x, rstd, b * s, s, width, _eps(eps), *x.stride(),
                                                 BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps)
    return rstd


def _frequencies(f: torch.Tensor, b: int, s: int, heads: int, half: int) -> torch.Tensor:
    """f broadcast to [B, S, H, D/2] with unit stride over D/2 (Wan's halves are strided views
    of [1, S, 1, D]: a contiguous copy is S·D/2 values)."""
    return f.contiguous().expand(b, s, heads, half)


def _launch(x, rstd, weight, cos, sin, heads, mode, out, scales=None, mean=None):
    b, s, width = x.shape
    d = width // heads
    cos4, sin4 = (_frequencies(f, b, s, heads, d // 2) for f in (cos, sin))
    limit = torch.finfo(torch.float32 if mean is not None else x.dtype).max
    rows = out.shape[-2] if mode == 1 else s  # the codes' padding rows are written too (zero)
    args = (x, rstd, weight if weight is not None else x, cos4, sin4, mean if mean is not None else x, out,
            scales if scales is not None else out, heads, s, rows, out.shape[1], limit, *x.stride(),
            *cos4.stride()[:3], *sin4.stride()[:3])
    flags = dict(MODE=mode, HAS_WEIGHT=weight is not None, HAS_MEAN=mean is not None, HEAD_DIM=d,
                 HW_CVT=not interpreting(), **NO_FMA)
    if single_config():
        block_s, warps = TILES[0]
        _rope_rows_kernel[(triton.cdiv(rows, block_s), b * heads)](*args, BLOCK_S=block_s, num_warps=warps, **flags)
    else:
        _rope_rows_autotuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_S"]), b * heads)](*args, **flags)


def rope_key_mean(x, weight, eps, cos, sin, heads, rstd: torch.Tensor | None = None) -> torch.Tensor:
    """``formats.attention.key_mean`` of the normed, rotated x: fp32 [B, H, 1, D]."""
    b, s, width = x.shape
    rstd = _rstd(x, eps) if rstd is None else rstd
    # one row of sums per tile of the smallest tile (a larger tile leaves rows unwritten: zeroed)
    partial = torch.zeros((b, triton.cdiv(s, min(t[0] for t in TILES)), heads, width // heads), dtype=torch.float32,
                          device=x.device)
    _launch(x, rstd, weight, cos, sin, heads, 0, partial)
    return (partial.sum(dim=1) / s)[:, :, None, :]


def quantize_qk_norm_rope(x, weight, eps, cos, sin, heads, mean: torch.Tensor | None = None,
                          rstd: torch.Tensor | None = None):
    """x [B, S, H·D] -> (int8 codes [B, H, S_pad, D], fp32 scales [B, H, S_pad]) of
    ``rms_norm_rope(x, ...)`` (minus ``mean`` [B, H, 1, D] if given), as
    ``attention.quantize_qk`` lays them out; rows past S are zero. ``rstd``: x's, if the caller
    has it (``rope_key_mean`` computed it for K)."""
    b, s, width = x.shape
    s_pad = -(-s // TOKEN_PAD) * TOKEN_PAD
    codes = torch.empty((b, heads, s_pad, width // heads), dtype=torch.int8, device=x.device)
    scales = torch.empty((b, heads, s_pad), dtype=torch.float32, device=x.device)
    rstd = _rstd(x, eps) if rstd is None else rstd
    _launch(x, rstd, weight, cos, sin, heads, 1, codes, scales, mean.contiguous() if mean is not None else None)
    return codes, scales


def quantized_attention_qk_norm_rope(q, k, v, q_weight, k_weight, q_eps, k_eps, q_cos, q_sin, k_cos, k_sin,
                                     scale=None):
    """``quantized_attention_reference(rms_norm_rope(q, ...), rms_norm_rope(k, ...), v)`` on the
    GPU (or the interpreter): q, k [B, S, H·D] before their norms, v [B, H, S, D]. The output
    is laid out as ``attention.quantized_attention``'s."""
    heads = v.shape[1]
    q_codes, q_scale = quantize_qk_norm_rope(q, q_weight, q_eps, q_cos, q_sin, heads)
    k_rstd = _rstd(k, k_eps)
    mean = rope_key_mean(k, k_weight, k_eps, k_cos, k_sin, heads, k_rstd)
    k_codes, k_scale = quantize_qk_norm_rope(k, k_weight, k_eps, k_cos, k_sin, heads, mean, k_rstd)
    vt_codes, v_scale = quantize_v(v)
    return attend(q_codes, q_scale, k_codes, k_scale, vt_codes, v_scale, q.shape[1], k.shape[1], q.dtype, scale)


__all__ = ["quantize_qk_norm_rope", "quantized_attention_qk_norm_rope", "rope_key_mean", "unsupported_reason"]
