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

from ._common import NO_FMA, is_nan, rne, round_to, saturate, where_nan
from .gemm import autotune_kwargs, single_config
from .attention import TOKEN_PAD, attend, quantize_v

#: (tokens, heads, warps) per tile, autotuned. A program takes BLOCK_S tokens of one batch row
#: and all heads, HEADS heads at a time: 16 tokens of a 5,120-wide bf16 row are 160 KB, which
#: stay in L2 between the program's two loops even with a few hundred programs in flight.
TILES = ((16, 2, 4), (16, 4, 8), (32, 2, 8), (8, 4, 4), (16, 1, 4))
#: the tile without autotuning (the interpreter, SIXBIT_GEMM_AUTOTUNE=0)
BLOCK_S, HEADS, WARPS = TILES[0]


@triton.jit
def _normed(x_base, w_ptr, offset, cols, ok, rstd, stride_c, HAS_WEIGHT: tl.constexpr):
    """x · rstd · weight at token offsets ``offset`` and channels ``cols``, rounded to x's
    dtype, as fp32."""
    x = tl.load(x_base + offset + cols * stride_c, mask=ok, other=0.0, eviction_policy="evict_first")
    n = x.to(tl.float32) * rstd
    if HAS_WEIGHT:
        n = n * tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return round_to(n, x.dtype)


@triton.jit
def _rotated_heads(x_base, w_ptr, cos_base, sin_base, s, h0, S, H, rstd, stride_s, stride_c,
                   cos_s, cos_h, cos_d, sin_s, sin_h, sin_d,
                   HAS_WEIGHT: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS: tl.constexpr):
    """Heads h0 .. h0 + HEADS of tokens s, normed and rotated: fp32 [BLOCK_S, HEADS, HEAD_DIM]
    holding values of x's dtype (0 past the last token or head), and the mask of real ones.

    Each channel also reads its pair partner (c ^ 1) instead of splitting the tile into even and
    odd halves, which costs layout shuffles: even c gets n·cos − partner·sin, odd c n·cos +
    partner·sin, i.e. the eager chain's x1·cos − x2·sin and x2·cos + x1·sin with its roundings."""
    head = h0 + tl.arange(0, HEADS)[None, :, None]
    d = tl.arange(0, HEAD_DIM)[None, None, :]
    tokens = s[:, None, None]
    ok = (tokens < S) & (head < H) & (d < HEAD_DIM)
    offset = tokens * stride_s
    rstd = rstd[:, None, None]
    n = _normed(x_base, w_ptr, offset, head * HEAD_DIM + d, ok, rstd, stride_c, HAS_WEIGHT)
    partner = _normed(x_base, w_ptr, offset, head * HEAD_DIM + (d ^ 1), ok, rstd, stride_c, HAS_WEIGHT)
    j = d // 2
    cos = tl.load(cos_base + tokens * cos_s + head * cos_h + j * cos_d, mask=ok, other=0.0)
    sin = tl.load(sin_base + tokens * sin_s + head * sin_h + j * sin_d, mask=ok, other=0.0)
    turn = partner * sin
    rotated = n * cos + tl.where((d % 2) == 0, -turn, turn)
    return round_to(rotated, x_base.dtype.element_ty), ok


@triton.jit
def _qk_norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, mean_ptr, out_ptr, scale_ptr,
    H, S, S_PAD, PARTIALS, WIDTH, eps, limit, stride_b, stride_s, stride_c,
    cos_b, cos_s, cos_h, cos_d, sin_b, sin_s, sin_h, sin_d,
    MODE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_MEAN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr, HEADS: tl.constexpr,
):
    """MODE 0: per-tile sums over the tokens of the normed, rotated x, fp32 [B, PARTIALS, H, D].
    MODE 1: its per-token INT8 codes [B·H, S_PAD, D] and scales [B·H, S_PAD] (minus
    mean [B, H, D] if HAS_MEAN), zero past S."""
    b = tl.program_id(1)
    tile = tl.program_id(0)
    s = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    x_base = x_ptr + b.to(tl.int64) * stride_b
    cos_base = cos_ptr + b.to(tl.int64) * cos_b
    sin_base = sin_ptr + b.to(tl.int64) * sin_b
    c = tl.arange(0, HEADS * HEAD_DIM)
    squares = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for c0 in range(0, WIDTH, HEADS * HEAD_DIM):  # the norm spans every head; these lines stay in L2
        ok = (s[:, None] < S) & (c0 + c[None, :] < WIDTH)
        x = tl.load(x_base + s[:, None] * stride_s + (c0 + c[None, :]) * stride_c, mask=ok, other=0.0,
                    eviction_policy="evict_last").to(tl.float32)
        squares += tl.sum(x * x, axis=1)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(squares, WIDTH.to(tl.float32)) + eps))
    d = tl.arange(0, HEAD_DIM)[None, None, :]
    for h0 in range(0, H, HEADS):
        r, ok = _rotated_heads(x_base, w_ptr, cos_base, sin_base, s, h0, S, H, rstd, stride_s, stride_c,
                               cos_s, cos_h, cos_d, sin_s, sin_h, sin_d, HAS_WEIGHT, HEAD_DIM, HEADS)
        head = h0 + tl.arange(0, HEADS)[None, :, None]
        if MODE == 0:
            row = (b * PARTIALS + tile) * H + head
            tl.store(out_ptr + row.to(tl.int64) * HEAD_DIM + d, tl.sum(r, axis=0)[None, :, :], mask=head < H)
        else:
            if HAS_MEAN:
                mean = tl.load(mean_ptr + (b * H + head) * HEAD_DIM + d, mask=head < H, other=0.0)
                r = tl.where(ok, r - mean, 0.0)
            r = saturate(r, limit)
            isnan = is_nan(r)
            amax = tl.max(tl.where(isnan, 0.0, tl.abs(r)), axis=2)
            has_nan = tl.max(isnan.to(tl.int32), axis=2) > 0
            scale = tl.math.div_rn(amax, 127.0)
            inv = tl.math.div_rn(1.0, tl.where(scale > 0, scale, 1.0))
            q = rne(tl.where(isnan, 0.0, r) * inv[:, :, None])
            q = tl.minimum(tl.maximum(q, -127.0), 127.0)
            heads = h0 + tl.arange(0, HEADS)[None, :]
            row = (b * H + heads).to(tl.int64) * S_PAD + s[:, None]  # [BLOCK_S, HEADS]
            real = (heads < H) & (s[:, None] < S_PAD)
            tl.store(out_ptr + row[:, :, None] * HEAD_DIM + d, q.to(tl.int8), mask=real[:, :, None])
            tl.store(scale_ptr + row, where_nan(has_nan, scale), mask=real)


_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_S": bs, "HEADS": hs}, num_warps=w) for bs, hs, w in TILES],
    key=["H", "WIDTH", "MODE", "HAS_MEAN"],
    **{**autotune_kwargs(), "prune_configs_by": None},  # (no TMA configs to prune)
)(_qk_norm_rope_kernel)


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
    limit = torch.finfo(torch.float32 if mean is not None else x.dtype).max
    args = (x, weight if weight is not None else x, cos4, sin4, mean if mean is not None else x, out,
            scale if scale is not None else out, heads, s, out.shape[-2] if mode == 1 else s, out.shape[1], width, eps, limit,
            *x.stride(), *cos4.stride(), *sin4.stride())
    flags = dict(MODE=mode, HAS_WEIGHT=weight is not None, HAS_MEAN=mean is not None, HEAD_DIM=d, **NO_FMA)
    rows = out.shape[-2] if mode == 1 else s  # the codes' padding rows are written too (zero)
    if single_config():
        _qk_norm_rope_kernel[(triton.cdiv(rows, BLOCK_S), b)](*args, BLOCK_S=BLOCK_S, HEADS=HEADS, num_warps=WARPS,
                                                              **flags)
    else:
        _autotuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_S"]), b)](*args, **flags)


def rope_key_mean(x, weight, eps, cos, sin, heads) -> torch.Tensor:
    """``formats.attention.key_mean`` of the normed, rotated x: fp32 [B, H, 1, D]."""
    b, s, width = x.shape
    # one row of sums per tile of the smallest BLOCK_S (a larger tile leaves rows unwritten: zeroed)
    tiles = triton.cdiv(s, min(t[0] for t in TILES))
    partial = torch.zeros((b, tiles, heads, width // heads), dtype=torch.float32, device=x.device)
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
