"""Wan's q / k RMS norm and RoPE, folded into the attention's Q / K quantization.

Spec: ``formats.attention.rms_norm_rope`` followed by ``quantize_queries`` / ``quantize_keys``
(op ``sixbit::quantized_attention_qk_norm_rope``, pass ``fold_qk_norm_rope``).

Unfolded, the projection's output x [B, S, H·D] makes three trips before the attention reads
it: Inductor's norm + RoPE kernel reads x and writes the rotated bf16 copy, K's token mean reads
that copy, and ``attention.quantize_qk`` reads it again to write the INT8 codes. At W-14B's
self-attention (32,760 tokens × 5,120) those were 1.2 + 0.13 + 0.47 ms on an H100
(docs/benchmarks.md, block run 9). Here one kernel reads x and writes the codes:

* a program takes ``BLOCK_S`` tokens of one batch row, all heads: a first loop over the heads
  sums the squares of the whole width (the norm spans every head), its loads marked
  ``evict_last`` so that the second loop, which normalizes, rotates and quantizes head by head,
  finds the tokens in L2;
* for K, a first launch (``MODE = 0``) writes per-tile sums of the normed, rotated keys and
  the host adds them into the token mean (K's smoothing needs the mean before any code is
  written); the second launch (``MODE = 1``) subtracts it.

Rounding follows the eager chain: the norm (x · rstd · weight in fp32) is rounded to x's
dtype, the rotation computes in fp32 (Wan's frequencies are fp32) without fused multiply-adds
and is rounded to x's dtype again; the codes are then those of ``attention.quantize_qk`` on
that tensor. The kernel's rstd (a correctly rounded division and square root) and its sums of
squares and of the mean run in another order than PyTorch's, so codes may move by one where a
value sits on a rounding boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.attention import key_mean
from ._common import NO_FMA, int8_rows, round_to, saturate
from .attention import TOKEN_PAD, attend, quantize_v

#: tokens per program: 16 tokens of a 5,120-wide row are 160 KB, which stay in L2 between the
#: program's two loops even with a few hundred programs in flight
BLOCK_S = 16


@triton.jit
def _rotated_head(x_base, w_ptr, cos_base, sin_base, s, ok, h, rstd, stride_s, stride_c,
                  cos_s, cos_h, cos_d, sin_s, sin_h, sin_d,
                  HAS_WEIGHT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """Head h of tokens s, normed and rotated: fp32 [BLOCK_S, HEAD_DIM] holding values of x's
    dtype (0 for tokens past the end)."""
    d = tl.arange(0, HEAD_DIM)
    c = h * HEAD_DIM + d
    x = tl.load(x_base + s[:, None] * stride_s + c[None, :] * stride_c, mask=ok[:, None], other=0.0,
                eviction_policy="evict_first")
    n = x.to(tl.float32) * rstd[:, None]
    if HAS_WEIGHT:
        n = n * tl.load(w_ptr + c).to(tl.float32)[None, :]
    n = round_to(n, x.dtype)  # rms_norm's output, in x's dtype
    even, odd = tl.split(tl.reshape(n, (BLOCK_S, HEAD_DIM // 2, 2)))
    j = tl.arange(0, HEAD_DIM // 2)
    cos = tl.load(cos_base + s[:, None] * cos_s + h * cos_h + j[None, :] * cos_d, mask=ok[:, None], other=0.0)
    sin = tl.load(sin_base + s[:, None] * sin_s + h * sin_h + j[None, :] * sin_d, mask=ok[:, None], other=0.0)
    re = round_to(even * cos - odd * sin, x.dtype)
    ro = round_to(even * sin + odd * cos, x.dtype)
    return tl.reshape(tl.join(re, ro), (BLOCK_S, HEAD_DIM))


@triton.jit
def _qk_norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, mean_ptr, out_ptr, scale_ptr,
    H, S, S_PAD, WIDTH, eps, limit, stride_b, stride_s, stride_c,
    cos_b, cos_s, cos_h, cos_d, sin_b, sin_s, sin_h, sin_d,
    MODE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_MEAN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """MODE 0: per-tile sums over the tokens of the normed, rotated x, fp32 [B, tiles, H, D].
    MODE 1: its per-token INT8 codes [B·H, S_PAD, D] and scales [B·H, S_PAD] (minus
    mean [B, H, D] if HAS_MEAN), zero past S."""
    b = tl.program_id(1)
    tile = tl.program_id(0)
    s = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = s < S
    x_base = x_ptr + b.to(tl.int64) * stride_b
    cos_base = cos_ptr + b.to(tl.int64) * cos_b
    sin_base = sin_ptr + b.to(tl.int64) * sin_b
    d = tl.arange(0, HEAD_DIM)
    squares = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for h in range(0, H):  # the norm spans every head; these loads stay in L2 for the loop below
        c = h * HEAD_DIM + d
        x = tl.load(x_base + s[:, None] * stride_s + c[None, :] * stride_c, mask=ok[:, None], other=0.0,
                    eviction_policy="evict_last").to(tl.float32)
        squares += tl.sum(x * x, axis=1)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(squares, WIDTH) + eps))
    for h in range(0, H):
        r = _rotated_head(x_base, w_ptr, cos_base, sin_base, s, ok, h, rstd, stride_s, stride_c,
                          cos_s, cos_h, cos_d, sin_s, sin_h, sin_d, HAS_WEIGHT, HEAD_DIM, BLOCK_S)
        if MODE == 0:
            row = (b * tl.num_programs(0) + tile) * H + h
            tl.store(out_ptr + row.to(tl.int64) * HEAD_DIM + d, tl.sum(r, axis=0))
        else:
            if HAS_MEAN:
                r = tl.where(ok[:, None], r - tl.load(mean_ptr + (b * H + h) * HEAD_DIM + d)[None, :], 0.0)
            q, scale, _, _ = int8_rows(saturate(r, limit))
            row = (b * H + h).to(tl.int64) * S_PAD + s
            tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], q.to(tl.int8))
            tl.store(scale_ptr + row, scale)


def unsupported_reason(x: torch.Tensor, weight, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> str | None:
    """Why the kernel cannot take this prologue, or None (the attention's own limits are
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


def _launch(x, weight, eps, cos, sin, heads, mode, out, scale=None, mean=None):
    b, s, width = x.shape
    d = width // heads
    cos4, sin4 = (f.expand(b, s, heads, d // 2) for f in (cos, sin))
    s_rows = out.shape[-2] if mode == 1 else s
    limit = torch.finfo(torch.float32 if mean is not None else x.dtype).max
    _qk_norm_rope_kernel[(triton.cdiv(s_rows, BLOCK_S), b)](
        x, weight if weight is not None else x, cos4, sin4, mean if mean is not None else x, out,
        scale if scale is not None else out, heads, s, s_rows, float(width), eps, limit, *x.stride(),
        *cos4.stride(), *sin4.stride(),
        MODE=mode, HAS_WEIGHT=weight is not None, HAS_MEAN=mean is not None, HEAD_DIM=d, BLOCK_S=BLOCK_S,
        num_warps=4, **NO_FMA,
    )


def rope_key_mean(x, weight, eps, cos, sin, heads) -> torch.Tensor:
    """``formats.attention.key_mean`` of the normed, rotated x: fp32 [B, H, 1, D]."""
    b, s, width = x.shape
    partial = torch.empty((b, triton.cdiv(s, BLOCK_S), heads, width // heads), dtype=torch.float32, device=x.device)
    _launch(x, weight, _eps(eps), cos, sin, heads, 0, partial)
    return (partial.sum(dim=1) / s)[:, :, None, :]


def quantize_qk_norm_rope(x, weight, eps, cos, sin, heads, mean: torch.Tensor | None = None):
    """x [B, S, H·D] -> (int8 codes [B, H, S_pad, D], fp32 scales [B, H, S_pad]) of
    ``rms_norm_rope(x, ...)`` (minus ``mean`` [B, H, 1, D] if given), as
    ``attention.quantize_qk`` lays them out; rows past S are zero."""
    b, s, width = x.shape
    s_pad = -(-s // TOKEN_PAD) * TOKEN_PAD
    codes = torch.empty((b, heads, s_pad, width // heads), dtype=torch.int8, device=x.device)
    scales = torch.empty((b, heads, s_pad), dtype=torch.float32, device=x.device)
    _launch(x, weight, _eps(eps), cos, sin, heads, 1, codes, scales, mean.contiguous() if mean is not None else None)
    return codes, scales


def _eps(eps: float | None) -> float:
    # torch.rms_norm's default for bf16 / fp16 / fp32 inputs: fp32's epsilon (its compute type)
    return torch.finfo(torch.float32).eps if eps is None else float(eps)


def quantized_attention_qk_norm_rope(q, k, v, q_weight, k_weight, q_eps, k_eps, q_cos, q_sin, k_cos, k_sin,
                                     scale=None):
    """``quantized_attention_reference(rms_norm_rope(q, ...), rms_norm_rope(k, ...), v)`` on the
    GPU (or the interpreter): q, k [B, S, H·D] before their norms, v [B, H, S, D]. The output
    is laid out as ``attention.quantized_attention``'s."""
    heads = v.shape[1]
    q_codes, q_scale = quantize_qk_norm_rope(q, q_weight, q_eps, q_cos, q_sin, heads)
    mean = rope_key_mean(k, k_weight, k_eps, k_cos, k_sin, heads)
    k_codes, k_scale = quantize_qk_norm_rope(k, k_weight, k_eps, k_cos, k_sin, heads, mean)
    vt_codes, v_scale = quantize_v(v)
    return attend(q_codes, q_scale, k_codes, k_scale, vt_codes, v_scale, q.shape[1], k.shape[1], q.dtype, scale)


__all__ = ["quantize_qk_norm_rope", "quantized_attention_qk_norm_rope", "rope_key_mean", "unsupported_reason"]
